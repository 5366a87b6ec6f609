"""The Q2 flow a YOLO user runs, after the trainer: the LayerNorm-free epochs inside Q2DetectionTrainer,
checkpoint -> integer detector (to_int), Ultralytics' validator and predictor on it, and the
branch-gradient diagnostic. Needs Ultralytics (the [ultralytics] extra; see README: its own env)."""
import copy

import numpy as np
import pytest
import torch

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()
pytest.importorskip("ultralytics", reason="Ultralytics is not installed (pip install q2kernels[ultralytics])")

from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.modules import Concat  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, load_checkpoint  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

from q2kernels.deploy import calibrate_fusion, layernorm_affine  # noqa: E402
from q2kernels.deploy.fusion import FixedFusion  # noqa: E402
from q2kernels.deploy.fusion_blend import BlendedFusion  # noqa: E402
from q2kernels.integrations.ultralytics import Q2DetectionTrainer, Q2Options, prepare, write_synthetic_dataset  # noqa: E402
from q2kernels.integrations.ultralytics.prepare import init_fusion_as_identity  # noqa: E402
from q2kernels.integrations.ultralytics.deploy import load_q2_checkpoint, predict, to_int, validate  # noqa: E402
from q2kernels.integrations.ultralytics.diagnostics import BranchGradients, imbalance  # noqa: E402
from q2kernels.nn import GatedFusion  # noqa: E402

IMGSZ = 64


def _run_args(tmp_path, data, name, epochs):
    return dict(model="yolov5n.yaml", data=str(data), epochs=epochs, imgsz=IMGSZ, batch=2, workers=0, device="cpu",
                amp=False, plots=False, project=str(tmp_path), name=name, exist_ok=True, mosaic=0.0,
                warmup_epochs=0, nbs=2, seed=0)


@pytest.fixture(scope="module")
def layernorm_free_run(tmp_path_factory):
    """Three epochs of Q2DetectionTrainer, the last two without LayerNorm; what the removal saw."""
    tmp_path = tmp_path_factory.mktemp("lnfree")
    data = write_synthetic_dataset(tmp_path / "ds", train=4, val=2, imgsz=IMGSZ)
    trainer = Q2DetectionTrainer(overrides=_run_args(tmp_path, data, "run", 3),
                                 q2=Q2Options(distill_weight=0.0, layernorm_free_epochs=2, calibration_batches=2))
    seen = {}

    def at_epoch_start(tr):  # runs after the trainer's own removal callback of the same event
        model = unwrap_model(tr.model)
        seen.setdefault(tr.epoch, {
            "live": {n: m for n, m in model.named_modules() if isinstance(m, (GatedFusion, FixedFusion))},
            "ema": {n: m for n, m in tr.ema.ema.named_modules() if isinstance(m, (GatedFusion, FixedFusion))},
            "best_fitness": tr.best_fitness,
            "gamma": {n: (m.gamma.detach().clone(), e.gamma.detach().clone()) for (n, m), e in zip(
                model.named_modules(), tr.ema.ema.modules()) if isinstance(m, GatedFusion)}})

    trainer.add_callback("on_train_epoch_start", at_epoch_start)
    trainer.train()
    return trainer, seen, data


def test_layernorm_free_epochs_remove_it_in_model_and_ema(layernorm_free_run):
    trainer, seen, _ = layernorm_free_run
    assert set(seen) == {0, 1, 2}
    assert all(isinstance(m, GatedFusion) for m in seen[0]["live"].values()) and len(seen[0]["live"]) == 4
    # fusion_init="identity" (the default) ran before the first step, in the model and the EMA alike.
    assert len(seen[0]["gamma"]) == 4
    for live, ema in seen[0]["gamma"].values():
        assert not torch.equal(live, torch.ones_like(live)) and torch.equal(live, ema)
    for epoch in (1, 2):  # removed at the start of epoch 1 (3 epochs, the last 2 LayerNorm-free)
        live, ema = seen[epoch]["live"], seen[epoch]["ema"]
        assert list(live) == list(ema) == list(seen[0]["live"])
        assert all(type(m) is FixedFusion and m.scale is not None for m in (*live.values(), *ema.values()))
    assert seen[1]["best_fitness"] is None  # the best checkpoint is chosen among LayerNorm-free epochs only
    # At the removal, the EMA got the live model's affine, value for value (not a copy of the module object).
    for name, node in seen[1]["live"].items():
        twin = seen[1]["ema"][name]
        assert twin is not node and (node.f, node.i) == (twin.f, twin.i)
    model = unwrap_model(trainer.model)
    assert model.q2["layernorm"] == "removed" and not any(isinstance(m, GatedFusion) for m in model.modules())


def test_blend_epochs_move_t_batch_by_batch_then_freeze(tmp_path):
    """layernorm_blend_epochs=1 of 2 LayerNorm-free epochs in 3: epoch 0 with LayerNorm, epoch 1 blends
    (t = 1/2, 2/2 over its 2 batches, in the live model and the EMA alike), epoch 2 trains the
    FixedFusion the blend ended in, and the best fitness restarts there, not at the blend."""
    data = write_synthetic_dataset(tmp_path / "ds", train=4, val=2, imgsz=IMGSZ)
    trainer = Q2DetectionTrainer(overrides=_run_args(tmp_path, data, "blend", 3), q2=Q2Options(
        distill_weight=0.0, layernorm_free_epochs=2, layernorm_blend_epochs=1, calibration_batches=2))
    seen = {"t": [], "types": {}, "best": {}}

    def at_batch(tr):  # after the trainer's own _step_blend of the same event
        live = [m for m in unwrap_model(tr.model).modules() if isinstance(m, BlendedFusion)]
        ema = [m for m in tr.ema.ema.modules() if isinstance(m, BlendedFusion)]
        seen["t"].append((tr.epoch, sorted({m.blend.item() for m in live}), sorted({m.blend.item() for m in ema})))

    def at_epoch(tr):
        kinds = {type(m).__name__ for m in unwrap_model(tr.model).modules()
                 if isinstance(m, (GatedFusion, BlendedFusion, FixedFusion))}
        seen["types"][tr.epoch] = kinds | {"ema:" + type(m).__name__ for m in tr.ema.ema.modules()
                                           if isinstance(m, (GatedFusion, BlendedFusion, FixedFusion))}
        seen["best"][tr.epoch] = tr.best_fitness

    def observe(tr):  # an observer's hook on the live nodes (a closure) must not reach the EMA's pickle
        for m in unwrap_model(tr.model).modules():
            if isinstance(m, GatedFusion):
                m.register_forward_hook(lambda *args: None)

    trainer.add_callback("on_train_start", observe)
    trainer.add_callback("on_train_batch_start", at_batch)
    trainer.add_callback("on_train_epoch_start", at_epoch)
    trainer.train()
    assert seen["types"] == {0: {"GatedFusion", "ema:GatedFusion"},
                             1: {"BlendedFusion", "GatedFusion", "ema:BlendedFusion", "ema:GatedFusion"},
                             2: {"FixedFusion", "ema:FixedFusion"}}
    assert [t for t in seen["t"] if t[0] == 1] == [(1, [0.5], [0.5]), (1, [1.0], [1.0])]
    assert all(live == [] for epoch, live, _ in seen["t"] if epoch != 1)
    assert seen["best"][1] is not None and seen["best"][2] is None
    model = unwrap_model(trainer.model)
    assert model.q2["layernorm"] == "removed"
    assert all(type(m) is FixedFusion and m.scale is not None for m in model.modules()
               if isinstance(m, (GatedFusion, BlendedFusion, FixedFusion)))


def test_options_refuse_a_blend_that_cannot_end_in_the_fixed_affine():
    with pytest.raises(ValueError, match="layernorm_blend_epochs: 2 must be less than layernorm_free_epochs"):
        Q2Options(layernorm_free_epochs=2, layernorm_blend_epochs=2)
    with pytest.raises(ValueError, match="needs layernorm_removal='mean'"):
        Q2Options(layernorm_free_epochs=3, layernorm_blend_epochs=1, layernorm_removal="fit")
    with pytest.raises(ValueError, match="layernorm_blend_epochs: expected an integer >= 0"):
        Q2Options(layernorm_free_epochs=3, layernorm_blend_epochs=-1)
    assert Q2Options(layernorm_free_epochs=3, layernorm_blend_epochs=2).layernorm_blend_epochs == 2


def test_removal_affine_is_the_calibrated_layernorm():
    """The trainer's removal is calibrate_fusion + the fixed affine of docs/math.md §5: on a prepared
    model, the FixedFusion's scale/shift equal layernorm_affine of the calibrated node (oracle: the
    affine recomputed here in float64 from the node's own statistics)."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    model.args = get_cfg()
    prepare(model, distill=False)
    batches = [torch.rand(2, 3, IMGSZ, IMGSZ) for _ in range(2)]
    calibrate_fusion(model, batches)
    for name, node in [(n, m) for n, m in model.named_modules() if isinstance(m, GatedFusion)]:
        _, A, B = layernorm_affine(node)
        a = torch.softmax(node.theta.double(), 0)
        gates = torch.cat([a[k].expand(c) for k, c in enumerate(node.channels)])
        torch.testing.assert_close(A, gates * node.gamma.double() / node.sigmabar.double())
        torch.testing.assert_close(B, node.beta.double() - node.gamma.double() * node.mubar.double()
                                   / node.sigmabar.double())


def test_checkpoint_converts_validates_predicts(layernorm_free_run, tmp_path):
    trainer, _, data = layernorm_free_run
    best = trainer.best
    model = load_q2_checkpoint(best)
    assert sum(isinstance(m, FixedFusion) for m in model.modules()) == 4  # a LayerNorm-free epoch's
    images = torch.rand(2, 3, IMGSZ, IMGSZ)
    int_model, check = to_int(model, images)
    assert check.exact, check.failures()
    maps50, maps = validate(int_model, data, IMGSZ, batch=2)
    assert 0 <= maps <= maps50 <= 1
    sample = sorted((data.parent / "images" / "val").iterdir())[0]
    results = predict(int_model, str(sample), IMGSZ, conf=0.0, save_dir=tmp_path / "pred")
    assert len(results) == 1 and results[0].boxes is not None and results[0].names == model.names
    assert (tmp_path / "pred" / f"{sample.stem}.jpg").exists()
    # The integer detector's raw predictions equal the fake-quant model's decoded through the same head
    # up to the certified rounding flips: identical where verify saw no differing code.
    if check.differing_fraction == 0:
        with torch.no_grad():
            torch.testing.assert_close(int_model(images), model(images)[0], rtol=1e-4, atol=1e-3)

    # Training continues from the LayerNorm-free checkpoint: its FixedFusion nodes are rebuilt.
    rebuilt = trainer.get_model(cfg=model.yaml, weights=load_checkpoint(best)[0], verbose=False)
    assert [n for n, m in rebuilt.named_modules() if isinstance(m, FixedFusion)] == \
        [n for n, m in model.named_modules() if isinstance(m, FixedFusion)]
    for (k, a), (k2, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_to_int_verifies_each_image_set_once(layernorm_free_run, monkeypatch):
    """to_int's images are verified once (the conversion's self-check is the verification returned);
    verify_images, when given, once more, and that verification is returned."""
    import q2kernels.deploy.convert as convert_module
    import q2kernels.integrations.ultralytics.deploy as deploy_module

    model = load_q2_checkpoint(layernorm_free_run[0].best)
    seen = []

    def counting(real):
        def verify(fq, int_model, x):
            seen.append(x.shape[0])
            return real(fq, int_model, x)
        return verify

    monkeypatch.setattr(convert_module, "verify_int_model", counting(convert_module.verify_int_model))
    monkeypatch.setattr(deploy_module, "verify_int_model", counting(deploy_module.verify_int_model))
    _, check = to_int(model, torch.rand(2, 3, IMGSZ, IMGSZ))
    assert seen == [2] and check.exact, check.failures()
    seen.clear()
    _, check = to_int(model, torch.rand(2, 3, IMGSZ, IMGSZ), verify_images=torch.rand(3, 3, IMGSZ, IMGSZ))
    assert seen == [2, 3]


def test_to_int_refuses_layernorm():
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    prepare(model, distill=False)
    with pytest.raises(ValueError, match=r"model: the fusion nodes \['model.12'.*still apply LayerNorm"):
        to_int(model, torch.rand(1, 3, IMGSZ, IMGSZ))


@pytest.mark.parametrize("fusion", [None, "balanced"])
def test_branch_gradients_are_the_gradients_through_each_node(fusion):
    """Oracles that share no code with the probe: for a Concat, the gradient of the loss with respect
    to the Concat's output (retain_grad), split into its branches' channels; for a GatedFusion, the branch
    norms its own backward hands to the gate controller (`grad_norm`). Branch tensors that other layers
    also read (YOLOv5's P4/P3 backbone outputs) must not add those layers' gradients."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    if fusion:
        prepare(model, fusion=fusion, distill=False)
    model.train()
    probe = BranchGradients(model)
    outputs, channels = {}, {}
    kind = GatedFusion if fusion else Concat

    def keep(mod, args, out, name):
        out.retain_grad()
        outputs[name] = out
        channels[name] = [x.shape[1] for x in args[0]]

    handles = [m.register_forward_hook(lambda mod, a, o, n=f"model.{i}": keep(mod, a, o, n))
               for i, m in enumerate(model.model) if isinstance(m, kind)]
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    out = model(x)
    loss = sum((f.float() ** 2).mean() for f in (out["feats"] if isinstance(out, dict) else out))
    names = sorted(outputs)
    loss.backward()
    for h in handles:
        h.remove()
    probe.remove()
    norms = probe.norms()
    assert sorted(norms) == names == ["model.12", "model.16", "model.19", "model.22"]
    for n in names:
        if fusion:  # one backward; the controller's own record of it
            assert norms[n].shape == (1, 2)
            torch.testing.assert_close(norms[n][0], model.get_submodule(n).grad_norm, rtol=1e-5, atol=0)
        else:
            want = torch.stack([g.double().norm() for g in outputs[n].grad.split(channels[n], dim=1)]).float()
            assert norms[n].shape == (1, 2)
            torch.testing.assert_close(norms[n][0], want, rtol=1e-5, atol=0)
    with torch.no_grad():  # no record outside training
        model(x)
    assert all(v.shape[0] == 1 for v in probe.norms().values())
    torch.testing.assert_close(imbalance(torch.tensor([[1.0, 4.0], [3.0, 1.5]])), torch.tensor([4.0, 2.0]))


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("float")
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=6, verbose=False)
    path = tmp_path / "float.pt"
    torch.save({"model": model}, path)
    return path, write_synthetic_dataset(tmp_path / "ds", train=4, val=2, imgsz=IMGSZ)


@pytest.mark.parametrize("recipe", ["lsq", "lsq_plus", "pact", "n2uq"])
@pytest.mark.parametrize("bits", [4, 3])
def test_q2_recipe_from_a_float_checkpoint(float_checkpoint, recipe, bits, tmp_path):
    """Every recipe and bit width through the whole flow: Q2 QAT from a float .pt (Q-ADA from it as the
    teacher, Q-GBFusion), the last epoch LayerNorm-free (the mean-statistics affine at 4 bits, the
    fitted one at 3), the checkpoint converted and verified exact."""
    weights, data = float_checkpoint
    args = {**_run_args(tmp_path, data, "run", 2), "model": str(weights), "val": False}
    removal = "fit" if bits == 3 else "mean"  # both fixed affines, over the recipes
    trainer = Q2DetectionTrainer(overrides=args, q2=Q2Options(recipe=recipe, w_bits=bits, a_bits=bits,
                                                              layernorm_free_epochs=1, calibration_batches=1,
                                                              layernorm_removal=removal))
    trainer.train()
    assert all(torch.isfinite(v).all() for v in trainer.tloss.values()) and trainer.tloss["qada_loss"] > 0
    model = load_q2_checkpoint(trainer.last)
    assert model.q2["teacher"] == str(weights) and model.q2["layernorm"] == "removed"
    _, check = to_int(model, torch.rand(2, 3, IMGSZ, IMGSZ))
    assert check.exact, check.failures()


def test_fusion_starts_as_the_concat_it_replaced():
    """init_fusion_as_identity: gamma and beta are the float model's mean per-pixel spread and mean of
    each Concat output (oracle: numpy float64 on the captured Concat inputs), and the fusion node's
    output is then far closer to the Concat's than with gamma = 1, beta = 0."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    reference = copy.deepcopy(model).eval()
    prepare(model, distill=False)
    batches = [torch.rand(2, 3, IMGSZ, IMGSZ) for _ in range(2)]
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=f"model.{i}": captured.setdefault(n, []).append(
        torch.cat(list(a[0]), 1).double().numpy())) for i, m in enumerate(reference.model) if isinstance(m, Concat)]
    stats = init_fusion_as_identity(model, reference, batches)
    for h in hooks:
        h.remove()
    nodes = {n: m for n, m in model.named_modules() if isinstance(m, GatedFusion)}
    assert sorted(stats) == sorted(nodes) == sorted(captured)
    x = batches[0]
    outputs, concats = {}, {}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: outputs.__setitem__(n, out)) for n, m in nodes.items()]
    handles += [m.register_forward_pre_hook(lambda mod, a, n=f"model.{i}": concats.__setitem__(n, torch.cat(list(a[0]), 1)))
                for i, m in enumerate(reference.model) if isinstance(m, Concat)]
    for name, node in nodes.items():
        h = np.concatenate(captured[name][:2])  # the two calibration batches
        mu = h.mean(axis=1).mean()
        sigma = np.sqrt(h.var(axis=1) + node.eps).mean()
        assert np.allclose(node.gamma.detach().numpy(), sigma, rtol=1e-5)
        assert np.allclose(node.beta.detach().numpy(), mu, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        reference(x)
        model(x)
        identity_error = {n: ((outputs[n] - concats[n]) ** 2).mean() / (concats[n] ** 2).mean() for n in nodes}
        for node in nodes.values():
            node.gamma.fill_(1.0)
            node.beta.fill_(0.0)
        model(x)
        default_error = {n: ((outputs[n] - concats[n]) ** 2).mean() / (concats[n] ** 2).mean() for n in nodes}
    for h in handles:
        h.remove()
    for n in nodes:
        assert identity_error[n] < 0.5 * default_error[n], (n, identity_error[n], default_error[n])
