"""Float32 masters with bf16 working copies (masters.py): the update is torch's Adam(W), the copies are the
masters rounded once, a skipped step changes nothing, the state resumes either way, and a training run with
them is the run without them up to where autocast's float32 `.grad` and the bf16 gradients differ."""

import copy
import json

import pytest
import torch
import yaml
from torch import nn
from trainer_fixtures import base_config, killed_then_resumed

from aligntrain.checkpoint import CHECKPOINTS
from aligntrain.config import ConfigError, load_config
from aligntrain.masters import MasterAdam, WorkingLinear, attach_working_copies
from aligntrain.trainer import train


def cfg_for(tmp_path, model_dir, name="cfg", **changes):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(base_config(model_dir, tmp_path / f"run-{name}", **changes)))
    return load_config(path)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(37, 11, generator=g), torch.randn(5, generator=g), torch.randn(3, 4, 2, generator=g)]


def _grads(step, shapes):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * (10.0 if step == 1 else 1.0) for s in shapes]


@pytest.mark.parametrize("decoupled", [True, False])
def test_the_update_is_torch_adam_with_the_clip_applied_as_it_reads_the_gradients(decoupled):
    """No working copies: MasterAdam's update (the torch-operations path of the CPU) against torch's Adam(W)
    after clip_grad_norm_, weight decay on, over steps whose gradients are and are not clipped."""
    ours = [nn.Parameter(p) for p in _params()]
    theirs = [nn.Parameter(p.clone()) for p in _params()]
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = MasterAdam([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:], "weight_decay": 0.0}],
                     lr=1e-2, decoupled=decoupled)
    ref = kind([{"params": theirs[:1], "weight_decay": 0.1}, {"params": theirs[1:], "weight_decay": 0.0}], lr=1e-2)
    for step in range(1, 5):
        for p, q, g in zip(ours, theirs, _grads(step, [p.shape for p in ours])):
            p.grad, q.grad = g.clone(), g.clone()
        norm = opt.clip_grad_norm_(3.0)
        assert norm.item() == pytest.approx(torch.nn.utils.clip_grad_norm_(theirs, 3.0).item(), rel=1e-6)
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 4


def _linear_stack(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4, bias=False))


def test_working_copies_take_the_gradients_and_are_the_masters_rounded_once():
    """The linear layers multiply by their bf16 copies; their bf16 gradients drive an update equal to
    AdamW's on float32 gradients of the same values; each copy is its new master rounded once; the
    state_dict still holds the float32 masters only."""
    model, twin = _linear_stack(), _linear_stack()
    keys = set(model.state_dict())
    working = attach_working_copies([model], torch.bfloat16)
    assert set(model.state_dict()) == keys and all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert {type(m) for m in model if isinstance(m, nn.Linear)} == {WorkingLinear} and len(working) == 3
    opt = MasterAdam(list(model.parameters()), lr=1e-2, working=working)
    ref = torch.optim.AdamW(list(twin.parameters()), lr=1e-2, weight_decay=0.0)
    x = torch.randn(6, 8)
    for _ in range(3):
        out = model(x.bfloat16())
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        assert all(p.grad is None for p in model.parameters())  # the copies hold them
        for master, q in zip(model.parameters(), twin.parameters()):
            q.grad = working[master].grad.float()  # the same gradient values, in float32
        opt.clip_grad_norm_(float("inf"))
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        for master, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(master.detach(), q.detach(), rtol=1e-5, atol=1e-6)
            assert torch.equal(working[master], master.detach().bfloat16())
            q.data.copy_(master.detach())  # the next forward starts both from the same weights


def test_micro_batches_fold_into_float32_sums():
    """Two micro-batches' bf16 gradients are summed in float32 (fold), not in bf16."""
    model = _linear_stack()
    working = attach_working_copies([model], torch.bfloat16)
    opt = MasterAdam(list(model.parameters()), lr=1e-2, working=working)
    xs = [torch.randn(6, 8), torch.randn(6, 8)]
    expected = {}
    for x in xs:
        model(x.bfloat16()).float().sum().backward()
        for master, copy in working.items():
            expected[master] = expected.get(master, 0) + copy.grad.float()
        opt.fold()
        assert all(copy.grad is None for copy in working.values())
    for master in working:
        assert opt.gradient(master).dtype == torch.float32
        torch.testing.assert_close(opt.gradient(master), expected[master], rtol=0, atol=0)
    opt.zero_grad()
    assert not opt.sums and all(opt.gradient(m) is None for m in working)


def test_a_step_with_found_inf_writes_nothing_and_does_not_count():
    model = _linear_stack()
    working = attach_working_copies([model], torch.bfloat16)
    opt = MasterAdam(list(model.parameters()), lr=1e-2, working=working)
    model(torch.randn(6, 8).bfloat16()).float().sum().backward()
    opt.step()  # step 1 is good
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    model(torch.randn(6, 8).bfloat16()).float().sum().backward()
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(model.parameters(), moments))
    assert all(torch.equal(working[p], p.detach().bfloat16()) for p in working)
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())


def test_the_state_resumes_in_torch_adamw_and_back():
    """MasterAdam's state_dict has torch AdamW's layout, one step tensor per parameter: each optimizer
    continues from the other's state to the same weights."""
    ps = [nn.Parameter(p) for p in _params()]
    opt = MasterAdam([{"params": ps, "weight_decay": 0.01}], lr=1e-2)
    for step in (1, 2):
        for p, g in zip(ps, _grads(step, [p.shape for p in ps])):
            p.grad = g
        opt.step()
    saved = opt.state_dict()
    steps = [s["step"] for s in saved["state"].values()]
    assert len({id(s) for s in steps}) == len(steps) and all(s.item() == 2 for s in steps)
    weights = [p.detach().clone() for p in ps]

    def continue_with(kind):
        qs = [nn.Parameter(w.clone()) for w in weights]
        other = kind([{"params": qs, "weight_decay": 0.01}], lr=1e-2)
        other.load_state_dict(copy.deepcopy(saved))  # loading keeps the tensors, which the step then changes
        for q, g in zip(qs, _grads(3, [q.shape for q in qs])):
            q.grad = g
        other.step()
        return other, qs

    torch_opt, torch_qs = continue_with(torch.optim.AdamW)
    ours_opt, ours_qs = continue_with(MasterAdam)
    for a, b in zip(torch_qs, ours_qs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    back = MasterAdam([{"params": [nn.Parameter(q.detach().clone()) for q in torch_qs], "weight_decay": 0.01}], lr=1e-2)
    back.load_state_dict(torch_opt.state_dict())
    assert all(s["step"].item() == 3 for s in back.state_dict()["state"].values())


def test_working_weights_true_is_refused_where_they_cannot_apply(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="working_weights.*model.policy_dtype: bfloat16"):
        cfg_for(tmp_path, tiny_model, working_weights=True)
    with pytest.raises(ConfigError, match="working_weights.*optimizer: Adam or AdamW"):
        cfg_for(tmp_path, tiny_model, working_weights=True, optimizer="RMSprop", model={"policy_dtype": "bfloat16"})


def _losses(result):
    return [h["loss"] for h in result.history]


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_a_run_with_working_copies_is_the_autocast_run(tmp_path, tiny_model, sft_shards, dpo_shards, task):
    """bf16 on the CPU, two micro-batches a step: the run with working copies follows the autocast run
    (both multiply by the same bf16 weights; the update differs only by float32 rounding), and its
    checkpoint holds float32 weights that a plain run resumes from."""
    shards = sft_shards if task == "sft" else dpo_shards
    changes = dict(model={"policy_dtype": "bfloat16"}, loss={"name": task, "beta": 0.1}, n_epochs=2, lr=1e-3)
    plain = train(cfg_for(tmp_path, tiny_model, f"{task}-plain", working_weights=False, **changes), shards)
    ours = train(cfg_for(tmp_path, tiny_model, f"{task}-working", working_weights=True, **changes), shards)
    assert len(ours.history) == len(plain.history) == 8
    assert _losses(ours) == pytest.approx(_losses(plain), rel=2e-3, abs=2e-3)
    assert [h["grad_norm"] for h in ours.history] == pytest.approx([h["grad_norm"] for h in plain.history], rel=2e-2)
    from safetensors.torch import load_file

    weights = load_file(str(ours.checkpoint / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert not any("working" in k for k in weights)


def test_killed_and_resumed_with_working_copies_equals_uninterrupted(tmp_path, tiny_model, sft_shards, monkeypatch):
    changes = dict(n_epochs=2, save_every_steps=3, working_weights=True, model={"policy_dtype": "bfloat16"})
    straight, resumed = killed_then_resumed(monkeypatch, lambda name: cfg_for(tmp_path, tiny_model, name, **changes),
                                            sft_shards, kill_at=5)
    assert _losses(resumed) == _losses(straight)[3:]  # bit-identical on CPU
    assert [h["grad_norm"] for h in resumed.history] == [h["grad_norm"] for h in straight.history[3:]]
    records = [json.loads(line) for line in (tmp_path / "run-killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
    assert (tmp_path / "run-killed" / CHECKPOINTS).is_dir()


def test_kernels_that_cannot_be_built_leave_the_update_to_torch_operations(monkeypatch):
    """Where Triton cannot build the update or the norm (e.g. no C compiler for its launcher), the optimizer
    says so once and updates with the torch operations: the same result as a run that never tried."""
    from aligntrain import kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "triton", object())
    monkeypatch.setattr(kernels, "master_adam_", broken)
    monkeypatch.setattr(kernels, "sum_squares", broken)
    model = _linear_stack()
    working = attach_working_copies([model], torch.bfloat16)
    opt = MasterAdam(list(model.parameters()), lr=1e-2, working=working)
    model(torch.randn(6, 8).bfloat16()).float().sum().backward()
    entries = [entry for group in opt._gradients() for entry in group]
    with pytest.warns(RuntimeWarning, match="Triton kernels are off"):
        assert opt._kernel_norm(entries) is None  # torch's norms serve
    assert not opt._kernel
    scalars = torch.tensor([1.0, 10.0, 0.03, 0.0])
    assert not opt._kernel_serves(opt.param_groups[0], entries, scalars, torch.bfloat16, torch.bfloat16)  # off now
    opt._kernel = True  # as if the norm had built: the update's own failure turns the kernels off the same way
    with pytest.warns(RuntimeWarning, match="Triton kernels are off"):
        assert not opt._kernel_serves(opt.param_groups[0], entries, scalars, torch.bfloat16, torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # on the CPU: the torch operations
    assert not any(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_working_weights_null_leaves_a_cpu_run_on_torchs_optimizer(tmp_path, tiny_model, sft_shards, monkeypatch):
    """null turns working copies on only for compiled runs on CUDA; a CPU run keeps torch's AdamW."""
    import aligntrain.trainer as T

    built = []
    build = T.build_optimizer
    monkeypatch.setattr(T, "build_optimizer", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    train(cfg_for(tmp_path, tiny_model, n_examples=8, model={"policy_dtype": "bfloat16"}), sft_shards)
    assert type(built[0]) is torch.optim.AdamW


def test_a_run_with_working_copies_says_so(tmp_path, tiny_model, sft_shards, capfd):
    train(cfg_for(tmp_path, tiny_model, n_examples=8, working_weights=True, model={"policy_dtype": "bfloat16"}),
          sft_shards)
    captured = capfd.readouterr()
    out = " ".join((captured.out + captured.err).split())  # the console may wrap the note
    assert "working_weights: 14 linear weights and biases of the decoder layers train through bfloat16" in out


def test_linears_that_share_a_weight_share_its_working_copy():
    """Two layers tied to one parameter multiply by one copy, whose gradient is the sum of both uses."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second)
    working = attach_working_copies([model], torch.bfloat16)
    assert len(working) == 1 and first.working_weight is second.working_weight
    model(torch.randn(3, 4).bfloat16()).float().sum().backward()
    copy = working[first.weight]
    assert copy.grad is not None and copy.grad.shape == (4, 4)


def test_working_copies_under_activation_checkpointing_get_the_same_gradients(tmp_path, tiny_model, sft_shards):
    """The recomputed layers multiply by the same copies and hand them the same gradients."""
    changes = dict(n_examples=16, working_weights=True, model={"policy_dtype": "bfloat16"})
    plain = train(cfg_for(tmp_path, tiny_model, "plain", **changes), sft_shards)
    recomputed = train(cfg_for(tmp_path, tiny_model, "recomputed", activation_checkpointing=True, **changes), sft_shards)
    assert _losses(recomputed) == pytest.approx(_losses(plain), rel=1e-5)
    assert [h["grad_norm"] for h in recomputed.history] == pytest.approx([h["grad_norm"] for h in plain.history],
                                                                          rel=1e-4)
