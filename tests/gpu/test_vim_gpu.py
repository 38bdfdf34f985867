"""Whole Vim models on the GPU kernels against the float64 CPU reference path, and under torch.compile."""
import pytest
import torch

timm = pytest.importorskip("timm")
import vim  # noqa: F401,E402  (registers the models)
from causal_conv1d import cuda_ops as conv_cuda_ops  # noqa: E402
from mamba_ssm.ops import extensions  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and conv_cuda_ops.available() and extensions.cuda.available()),
    reason="needs a CUDA GPU and the built extensions",
)


def _perturbed_model(name, **kwargs):
    """A model whose SSM parameters are moved away from their initial values, so that no term is trivial."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("A_log", "A_b_log")):
                p.add_(0.3 * torch.randn_like(p))
            elif pname.endswith((".D", ".D_b", "conv1d.bias", "conv1d_b.bias", "norm.weight")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "vim_tiny_patch16_stride8_224"])
def test_vim_tiny_kernels_match_float64_reference(name):
    model = _perturbed_model(name, num_classes=10)
    images = torch.randn(2, 3, 224, 224)
    labels = torch.tensor([3, 7])

    reference = model.double()
    ref_images = images.double().requires_grad_()
    ref_logits = reference(ref_images)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits, labels)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}

    gpu_model = model.float().cuda()
    gpu_model.zero_grad(set_to_none=True)
    gpu_images = images.cuda().requires_grad_()
    logits = gpu_model(gpu_images)
    loss = torch.nn.functional.cross_entropy(logits, labels.cuda())
    loss.backward()

    assert torch.isfinite(logits).all()
    assert _rel_err(loss.cpu(), ref_loss.detach()) < 1e-4
    assert _rel_err(gpu_images.grad.cpu(), ref_images.grad) < 1e-3
    for pname, p in gpu_model.named_parameters():
        assert _rel_err(p.grad.cpu(), ref_grads[pname]) < 2e-3, pname
    with torch.inference_mode():  # the inference path: convs fused into the scan kernel
        assert _rel_err(gpu_model(images.cuda()).cpu(), ref_logits.detach()) < 1e-4


@pytest.mark.parametrize("size", [(224, 224), (40, 57)])
def test_patch_embedding_matmul_equals_the_conv(size):
    """On CUDA non-overlapping patches are embedded by one matmul: the same map as the strided conv (float64,
    rows and columns that do not fill a patch dropped), with the same gradients."""
    from vim.models_mamba import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(img_size=size, patch_size=16, stride=16, embed_dim=24).double()
    images = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.conv2d(images, embed.proj.weight, embed.proj.bias, stride=16).flatten(2).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), (images, embed.proj.weight, embed.proj.bias))
    embed.cuda()
    gpu_images = images.detach().cuda().requires_grad_()
    out, grid = embed(gpu_images)
    assert grid == (size[0] // 16, size[1] // 16)
    grads = torch.autograd.grad(out.square().sum(), (gpu_images, embed.proj.weight, embed.proj.bias))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16, _ = embed.float()(gpu_images.detach().float())
    assert bf16.dtype == torch.bfloat16
    assert _rel_err(bf16.float().cpu(), ref.detach()) < 1e-2


def test_bf16_autocast_follows_fp32():
    model = _perturbed_model("vim_tiny_patch16_224", num_classes=10).cuda().eval()
    images = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        fp32 = model(images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(images)
    assert bf16.dtype == torch.bfloat16
    assert _rel_err(bf16.float(), fp32) < 5e-2


def test_torch_compile_training_step():
    model = _perturbed_model("vim_tiny_patch16_224", num_classes=10, depth=4).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = torch.compile(model)
    images = torch.randn(8, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 10, (8,), device="cuda")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eager_loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss = torch.nn.functional.cross_entropy(compiled(images), labels)
    loss.backward()
    optimizer.step()
    assert abs(loss.item() - eager_loss.item()) < 1e-3 * abs(eager_loss.item()) + 1e-4
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)


def test_trainer_fuses_adamw_on_cuda():
    """main.py's AdamW on CUDA parameters is torch's fused one, and one step of it equals a plain
    (per-tensor loop) AdamW built from the same parameter groups."""
    import main as trainer

    model = _perturbed_model("vim_tiny_patch16_224", num_classes=10, depth=2).cuda()
    args = trainer.get_args_parser().parse_args(["--weight-decay", "0.05", "--opt-betas", "0.8", "0.95"])
    optimizer = trainer.build_optimizer(model, args, lr=1e-3)
    assert all(group["fused"] for group in optimizer.param_groups)
    sgd = trainer.build_optimizer(model, trainer.get_args_parser().parse_args(["--opt", "sgd"]), lr=1e-3)
    assert not any(group.get("fused") for group in sgd.param_groups)

    params = [p for group in optimizer.param_groups for p in group["params"]]
    copies = {id(p): p.detach().clone().requires_grad_() for p in params}
    plain = torch.optim.AdamW([{"params": [copies[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
                               for g in optimizer.param_groups], lr=1e-3, betas=(0.8, 0.95), eps=args.opt_eps,
                              foreach=False)
    for p in params:
        p.grad = torch.randn_like(p)
        copies[id(p)].grad = p.grad.clone()
    optimizer.step()
    plain.step()
    for p in params:
        torch.testing.assert_close(p.detach(), copies[id(p)].detach(), rtol=1e-6, atol=1e-7)
