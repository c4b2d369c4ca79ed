"""Mixed precision and resume on the parts the CPU can run: the AMP choice with the GPU's answers patched in (a T4 or
V100 must not get bf16), restoring a checkpoint after a change that check_resumable allows (fp16 turned on,
channels_last toggled, CPU to GPU, lr, optimizer), and input preparation that builds no tensor per step."""

import copy
import io

import pytest
import torch

from support import TINY
from unetseg.contract.config import TrainConfig
from unetseg.contract.errors import ConfigError
from unetseg.model import build_model, freeze_unused, normalization
from unetseg.training import autocast_dtype, build_optimizer, load_learnt, lr_schedule

# --- the AMP choice ---------------------------------------------------------------------------------------------

GPUS = {"Tesla T4": (7, 5), "Tesla V100-SXM2-16GB": (7, 0), "NVIDIA A10G": (8, 6), "NVIDIA H100 80GB HBM3": (9, 0)}


@pytest.fixture
def gpu(monkeypatch):
    """Make torch answer as on a machine with the named GPU. is_bf16_supported() answers as torch 2.14 does there:
    True on every CUDA GPU when emulation counts (the default), else only from compute capability 8.0."""
    def use(name: str) -> torch.device:
        capability = GPUS[name]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or capability >= (8, 0))
        return torch.device("cuda", 0)
    return use


@pytest.mark.parametrize("name, expected", [("Tesla T4", torch.float16), ("Tesla V100-SXM2-16GB", torch.float16),
                                            ("NVIDIA A10G", torch.bfloat16), ("NVIDIA H100 80GB HBM3", torch.bfloat16)])
def test_amp_auto_trains_in_bf16_only_where_the_gpu_computes_it(gpu, name, expected):
    said = []
    assert autocast_dtype(TrainConfig(**TINY, amp="auto"), gpu(name), said.append) == expected


def test_amp_bf16_on_a_gpu_without_it_is_refused_by_name(gpu):
    with pytest.raises(ConfigError, match=r"hyperparameter 'amp' = 'bf16': Tesla T4 .*use fp16 or auto"):
        autocast_dtype(TrainConfig(**TINY, amp="bf16"), gpu("Tesla T4"), print)


class OnAnyDevice(torch.nn.Identity):
    """A model that stays where it is: the Segmenter moves its model to the device, and there is no GPU here."""

    def to(self, *args, **kwargs):
        return self


@pytest.mark.parametrize("name, expected", [("Tesla T4", None), ("Tesla V100-SXM2-16GB", None),
                                            ("NVIDIA A10G", torch.bfloat16)])
def test_inference_uses_bf16_only_where_the_gpu_computes_it(gpu, name, expected):
    from unetseg.segmenter import Segmenter

    device = gpu(name)
    config = {"normalization": {"mode": "per_image"}, "input": {"stride": 32}, "in_channels": 3,
              "class_names": ["a", "b"], "class_colors": [[0, 0, 0], [255, 0, 0]]}
    assert Segmenter(OnAnyDevice(), config, device=device).amp == expected


# --- restoring a checkpoint into the parts built for this run ---------------------------------------------------

def parts(*, channels_last=False, fused=False, fp16=False, **hps):
    """Model, optimizer, schedule and scaler as training builds them; `fused` builds the optimizer as on a GPU (fused
    AdamW runs on the CPU too), `channels_last` the model as on a GPU, `fp16` the grad scaler as for fp16."""
    cfg = TrainConfig(**{**TINY, **hps})
    model = build_model(cfg, pretrained=False)
    freeze_unused(model, cfg.in_channels, cfg.stride)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, torch.device("cuda" if fused else "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, steps_per_epoch=4))
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=fp16)


def trained_checkpoint(*, channels_last=False, fused=False, fp16=False, **hps) -> dict:
    """What last.pt holds after two steps, through torch.save and torch.load as the checkpoint goes."""
    torch.manual_seed(0)
    model, optimizer, scheduler, scaler = parts(channels_last=channels_last, fused=fused, fp16=fp16, **hps)
    for _ in range(2):
        x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "hyperparameters": TrainConfig(**{**TINY, **hps}).to_hyperparameters()},
               buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def step_with_fixed_gradients(model, optimizer) -> dict[str, torch.Tensor]:
    """One optimizer step on the same gradients whatever the memory layout: the weights after it."""
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator))
    optimizer.step()
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def test_resuming_with_fp16_after_a_run_without_a_grad_scaler(tmp_path):
    state = trained_checkpoint(fp16=False)  # bf16 or fp32 before: the scaler's state is empty
    model, optimizer, scheduler, scaler = parts(fp16=True)
    said = []
    load_learnt(state, model, optimizer, scheduler, scaler, said.append)
    assert scaler.is_enabled() and scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()  # a fresh scaler
    assert any("grad scaler" in line for line in said), said
    loss = torch.nn.functional.cross_entropy(model(torch.rand(2, 3, 32, 32)), torch.randint(0, 2, (2, 32, 32)))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


@pytest.mark.parametrize("saved_layout, resumed_layout", [(False, True), (True, False)])
def test_resuming_with_channels_last_toggled_steps_as_without_the_toggle(saved_layout, resumed_layout):
    # Fused AdamW reads a parameter and its moments as flat memory: moments in the checkpoint's old layout make CUDA
    # refuse the step and the CPU kernel compute a wrong one. The resumed step must equal the step of a run that never
    # changed layout.
    state = trained_checkpoint(channels_last=saved_layout, fused=True)
    reference = parts(channels_last=saved_layout, fused=True)
    load_learnt(copy.deepcopy(state), *reference, print)  # a copy each: loading shares the tensors; a step writes them
    expected = step_with_fixed_gradients(reference[0], reference[1])

    model, optimizer, scheduler, scaler = parts(channels_last=resumed_layout, fused=True)
    said = []
    load_learnt(copy.deepcopy(state), model, optimizer, scheduler, scaler, said.append)
    got = step_with_fixed_gradients(model, optimizer)
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-6, f"the resumed step differs by up to {worst} from one without the layout change"
    assert any("layout" in line for line in said), said


def test_resuming_on_a_gpu_a_run_started_on_the_cpu_uses_the_fused_optimizer():
    state = trained_checkpoint(fused=False)
    model, optimizer, scheduler, scaler = parts(fused=True)
    said = []
    load_learnt(state, model, optimizer, scheduler, scaler, said.append)
    assert all(group["fused"] for group in optimizer.param_groups), optimizer.param_groups[0]
    assert any("fused" in line for line in said), said
    step_with_fixed_gradients(model, optimizer)


def test_resuming_with_a_new_learning_rate_and_weight_decay_uses_them_at_the_saved_schedule_position():
    state = trained_checkpoint(lr=0.003, weight_decay=0.01)
    model, optimizer, scheduler, scaler = parts(lr=0.01, weight_decay=0.05)
    load_learnt(state, model, optimizer, scheduler, scaler, print)
    factor = lr_schedule(TrainConfig(**TINY), steps_per_epoch=4)(scheduler.last_epoch)
    assert scheduler.last_epoch == 2
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * factor] * 2)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]  # norms and biases never decay
    assert scheduler.base_lrs == [0.01, 0.01]


def test_resuming_with_another_optimizer_starts_its_state_fresh_and_says_so():
    state = trained_checkpoint(optimizer="adamw")
    model, optimizer, scheduler, scaler = parts(optimizer="sgd")
    said = []
    load_learnt(state, model, optimizer, scheduler, scaler, said.append)
    assert any("optimizer" in line and "adamw" in line and "sgd" in line for line in said), said
    assert torch.equal(model.state_dict()["segmentation_head.0.weight"], state["model"]["segmentation_head.0.weight"])
    assert scheduler.last_epoch == 2
    step_with_fixed_gradients(model, optimizer)


# --- input preparation --------------------------------------------------------------------------------------------

def test_preparing_a_batch_builds_no_tensor_from_python_values(monkeypatch):
    # A tensor built from a Python list on a GPU is a host-to-device copy, a sync, at every step. The normalization's
    # mean and std go to each device once; preparing a batch after that builds none.
    from unetseg.segmenter import prepare_input

    norm = normalization(TrainConfig(**TINY))
    batch = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    expected = prepare_input(batch, norm)

    def refuse(*args, **kwargs):
        raise AssertionError("prepare_input built a tensor from Python values")

    monkeypatch.setattr(torch, "tensor", refuse)
    monkeypatch.setattr(torch, "as_tensor", refuse)
    assert torch.equal(prepare_input(batch, norm), expected)
