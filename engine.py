"""One training epoch and one evaluation pass."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from trainer.distributed import get_world_size, is_dist_avail_and_initialized, log
from trainer.metrics import MetricLogger, SmoothedValue
from trainer.preemption import Preempted


class TrainingDiverged(Exception):
    """Too many consecutive steps with a non-finite loss or gradient."""


def bare_model(model):
    """The module under torch.compile's and DDP's wrappers (whose state_dict keys carry prefixes)."""
    model = getattr(model, '_orig_mod', model)
    return getattr(model, 'module', model)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, args, *, lr_scheduler, steps_per_epoch,
                    start_step=0, scaler=None, amp_dtype=None, model_ema=None, mixup_fn=None, stop_request=None,
                    save_checkpoint=None):
    """Train for the rest of `epoch`, from step `start_step`; return the averaged meters.

    Steps whose loss or gradient is not finite are skipped (no optimizer or EMA update) and counted;
    `args.max_nonfinite_steps` consecutive ones raise TrainingDiverged unless `args.if_continue_inf`.
    Every `args.save_every_steps` steps, and when `stop_request` fires, `save_checkpoint(epoch, steps
    done)` is called; after a stop request Preempted is raised. A stop on the epoch's last step saves
    the trained state with the epoch's averages (`train_stats`) and returns: the caller's epoch end then
    evaluates, logs and commits before stopping. All processes take these decisions
    together (one small all-reduce per step), so none is left waiting in a collective.
    """
    model.train()
    criterion.train()
    metric_logger = MetricLogger()
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    metric_logger.add_meter('skipped_steps', SmoothedValue(window_size=1, fmt='{total:.0f}'))
    params = [p for p in model.parameters() if p.requires_grad]
    consecutive_nonfinite, stop = 0, False
    header = f'Epoch: [{epoch}]'
    batches = metric_logger.log_every(data_loader, args.print_freq, header, total=steps_per_epoch, start=start_step)
    for step, (samples, targets) in enumerate(batches, start=start_step):
        global_step = epoch * steps_per_epoch + step
        lr_scheduler.step_update(num_updates=global_step)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        if args.if_nan2num:
            loss = torch.nan_to_num(loss)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = get_total_norm([p.grad for p in params if p.grad is not None])

        flags = torch.stack([~(torch.isfinite(loss) & torch.isfinite(grad_norm)),
                             torch.full((), bool(stop_request and stop_request.requested), device=device)]).float()
        if is_dist_avail_and_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop = (bool(f) for f in flags.tolist())

        if nonfinite:
            consecutive_nonfinite += 1
            log(f'step {global_step} (epoch {epoch}, iteration {step}): loss {loss.item()} / gradient norm '
                f'{grad_norm.item()} not finite, step skipped ({consecutive_nonfinite} in a row)')
            if consecutive_nonfinite >= args.max_nonfinite_steps and not args.if_continue_inf:
                raise TrainingDiverged(
                    f'{consecutive_nonfinite} consecutive steps up to step {global_step} (epoch {epoch}, iteration '
                    f'{step}) had a non-finite loss or gradient; likely cause: learning rate too high (lower --lr, '
                    f'add --clip-grad 1.0) or fp16 overflow (use --amp-dtype bfloat16 or --no-amp); the weights '
                    f'were not updated by those steps and the last checkpoint is intact')
        else:
            consecutive_nonfinite = 0
            if args.clip_grad:
                clip_grads_with_norm_(params, args.clip_grad, grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
            if model_ema is not None:
                model_ema.update(bare_model(model), step=global_step)
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

        metric_logger.update(skipped_steps=float(nonfinite))
        if not nonfinite:
            metric_logger.update(loss=loss.item())
        metric_logger.update(lr=optimizer.param_groups[0]['lr'])

        steps_done = step + 1
        if steps_done < steps_per_epoch:  # a stop on the last step is served at the epoch's end, after evaluation
            periodic_save = args.save_every_steps and steps_done % args.save_every_steps == 0
            if save_checkpoint is not None and (stop or periodic_save):
                save_checkpoint(epoch, steps_done)
            if stop:
                raise Preempted(f'stopped after step {global_step} (epoch {epoch}, iteration {step})')

    metric_logger.synchronize_between_processes(device)
    log('Averaged stats:', metric_logger)
    stats = metric_logger.global_averages()
    # every process skips the same steps, and the synchronised total counted them once per process
    stats['skipped_steps'] = metric_logger.meters['skipped_steps'].total / get_world_size()
    if stop and save_checkpoint is not None:  # first secure the epoch's training: its evaluation may take long
        save_checkpoint(epoch, steps_per_epoch, train_stats=stats)
    return stats


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype=None, split_across_processes=False, print_freq=50):
    """Cross-entropy loss and top-1/top-5 accuracy (percent) over the loader, or over the union of all
    processes' loaders when each holds a share of the data (`split_across_processes`).

    Sums stay on the device until the end, so evaluation does not synchronise every batch.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for images, target in MetricLogger().log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        loss = F.cross_entropy(output.float(), target, reduction='sum')
        hits = output.topk(min(5, output.shape[1]), dim=1).indices.eq(target[:, None])
        sums += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.sum().double(),
                             torch.full((), float(target.numel()), dtype=torch.float64, device=device)])
    if split_across_processes and is_dist_avail_and_initialized():
        dist.all_reduce(sums)
    loss_sum, top1, top5, count = sums.tolist()
    stats = {'loss': loss_sum / count, 'acc1': 100.0 * top1 / count, 'acc5': 100.0 * top5 / count,
             'num_images': int(count)}
    log(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}')
    return stats
