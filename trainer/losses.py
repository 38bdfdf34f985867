"""Knowledge distillation from a frozen teacher (DeiT's soft and hard variants)."""
import torch
import torch.nn.functional as F


class DistillationLoss(torch.nn.Module):
    """(1 - alpha) * base_criterion(student, targets) + alpha * distillation term.

    A model with a distillation token returns (class logits, distillation logits); Vim has no such
    token, so its single logits serve both terms.
    soft: KL divergence between the tempered (tau) student and teacher distributions, times tau^2,
          averaged over batch *and* classes as in DeiT, so that alpha keeps DeiT's meaning.
    hard: cross-entropy against the teacher's top-1 class.
    """

    def __init__(self, base_criterion, teacher, distillation_type='none', alpha=0.5, tau=1.0):
        super().__init__()
        if distillation_type not in ('none', 'soft', 'hard'):
            raise ValueError(f'distillation_type must be none, soft or hard, not {distillation_type!r}')
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, targets):
        outputs, outputs_kd = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        base_loss = self.base_criterion(outputs, targets)
        if self.distillation_type == 'none':
            return base_loss
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if self.distillation_type == 'soft':
            t = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / t, dim=1), F.log_softmax(teacher_outputs / t, dim=1),
                reduction='sum', log_target=True) * (t * t) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha
