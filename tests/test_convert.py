"""`python -m masksub_jax.convert` as a user runs it: the family, variant and image size read from the
weights (and for --to_timm from the workdir), what it prints to use the result, and its mistakes in
one line. Fixtures are random weights in each family's timm layout (to_timm of our own); no download,
no forward pass."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from masksub_jax import checkpoint, convert, init_from, workdir
from masksub_jax.models import resnet, swin, vit, weights
from tests.conftest import REPO


def _convert(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "masksub_jax.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False, env=env)


def _random_variables(model, image_size: int, channels: int = 3) -> dict:
    """The model's variables (shapes from its init, without running it) filled with seeded noise."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, channels)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


# family -> (our model, the image size its weights are made for, input channels, what convert prints).
SMALL = {
    "vit": (vit.ViT(num_classes=10, variant="mu/4"), 16, 3, "vit mu/4 at 16 px, a head of 10 classes"),
    "swin": (swin.Swin(num_classes=6, variant="mu/2", block_size=4), 16, 3, "swin mu/2 at 16 px, a head of 6 classes"),
    "resnet": (resnet.ResNet(num_classes=4, variant="mu", block_size=4), 32, 1, "resnet mu, a head of 4 classes"),
}


def _timm_file(family: str, variables: dict, path) -> dict:
    """Our variables in timm's names, written as a user's .safetensors download; returns the state dict."""
    module = {"vit": vit, "swin": swin, "resnet": resnet}[family]
    state_dict = module.to_timm(variables if family == "resnet" else variables["params"])
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}, str(path))
    return load_file(str(path))


@pytest.mark.parametrize("family", SMALL)
def test_each_family_is_read_from_the_weights_and_goes_back_to_timm_unchanged(family, tmp_path, capsys):
    model, size, channels, said = SMALL[family]
    variables = _random_variables(model, size, channels)
    variables["params"].pop("mask_token", None)  # Swin's MaskSub token: timm's Swin has none
    timm_weights = _timm_file(family, variables, tmp_path / "download.safetensors")

    done = _convert(f"--from={tmp_path / 'download.safetensors'}", f"--to={tmp_path / 'init'}")  # no family, variant
    assert done.returncode == 0, done.stderr
    assert f"The weights are {said}." in done.stdout
    assert "Train from it with:\n  python -m masksub_jax.main --config=" in done.stdout
    assert f"--config.init_from={tmp_path / 'init'}" in done.stdout
    read = convert.read_variables(str(tmp_path / "init"))
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(read), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    assert jax.tree.structure(read) == jax.tree.structure(variables)
    record = json.loads((tmp_path / "init" / init_from.METADATA).read_text())
    assert {k: record[k] for k in ("family", "variant", "image_size", "num_classes")} == {
        "family": family, "variant": model.variant, "image_size": None if family == "resnet" else size,
        "num_classes": model.num_classes}
    assert record["fingerprints"] == checkpoint.fingerprint_record(variables)

    convert.main(["--to_timm", f"--from={tmp_path / 'init'}", f"--to={tmp_path / 'new' / 'back.safetensors'}"])
    assert f"{said}, as {tmp_path / 'init' / init_from.METADATA} records" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)  # the file's folder is made, and others may read the file as any new file of theirs
    assert os.stat(tmp_path / "new" / "back.safetensors").st_mode & 0o777 == 0o666 & ~umask
    exported = load_file(str(tmp_path / "new" / "back.safetensors"))
    assert exported.keys() == timm_weights.keys()
    # float32 as timm's own files; ResNet's num_batches_tracked stays an integer, as timm's buffer is
    assert {k: (str(v.dtype), v.shape) for k, v in exported.items() if v.dtype != np.float32} == {
        k: ("int64", ()) for k in exported if k.endswith("num_batches_tracked")}
    for name, value in timm_weights.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def _zeros_in_timm_names(family, model, size) -> dict:
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    return family.to_timm(variables if family is resnet else variables["params"])


@pytest.mark.parametrize("family, model, size, config, timm_call", [
    (vit, vit.ViT(num_classes=1000, variant="S/16"), 224, "vit_s", ("deit3_small_patch16_224", {"img_size": 224})),
    (vit, vit.ViT(num_classes=1000, variant="B/16"), 224, "vit_b_ft224", ("deit3_base_patch16_224", {"img_size": 224})),
    (vit, vit.ViT(num_classes=1000, variant="B/16", pool="avg", layerscale_init=0.0), 224, "mae_vit_b",
     ("deit3_base_patch16_224", {"img_size": 224, "init_values": 0, "global_pool": "avg"})),
    (swin, swin.Swin(num_classes=1000, variant="T/4"), 224, "swin_t",
     ("swin_tiny_patch4_window7_224", {"img_size": 224})),
    (resnet, resnet.ResNet(num_classes=1000, variant="50"), 224, "resnet50", ("resnet50", {})),
])
def test_published_sizes_give_their_config_and_timm_model(family, model, size, config, timm_call):
    """The published models: the variant and image size read from the shapes, the shipped config that
    trains them without overrides, and timm's model of the same name."""
    state_dict = _zeros_in_timm_names(family, model, size)
    found = family.detect(state_dict)
    assert (found["variant"], found["num_classes"]) == (model.variant, 1000)
    assert found["image_size"] == (None if family is resnet else size)
    assert [m.detect(state_dict) for m in (vit, swin, resnet) if m is not family] == [None, None]
    assert convert.train_command(family.__name__.split(".")[-1], found, "inits/x") == (
        f"python -m masksub_jax.main --config={config} --workdir=WORKDIR --config.init_from=inits/x")
    assert family.timm_model(state_dict, found["variant"], found["image_size"]) == timm_call


def test_swin_in_the_original_layout_is_read_as_timms():
    """Microsoft's / augsub's Swin merges at the end of a stage and names the head head.*: the same
    relative position tables, so the same variant."""
    sd = _zeros_in_timm_names(swin, swin.Swin(num_classes=1000, variant="T/4"), 224)
    original = {}
    for key, value in sd.items():
        if ".downsample." in key:
            key = f"layers.{int(key.split('.')[1]) - 1}.downsample." + key.split(".downsample.", 1)[1]
        original["module." + key.replace("head.fc.", "head.")] = value
    assert swin.detect(original) == swin.detect(sd) == {"variant": "T/4", "image_size": 224, "num_classes": 1000,
                                                       "config": {}}


def test_a_family_or_variant_that_disagrees_with_the_weights_is_one_line_naming_both(tmp_path):
    model, size, _, _ = SMALL["vit"]
    _timm_file("vit", _random_variables(model, size), tmp_path / "vit.safetensors")
    family = _convert(f"--from={tmp_path / 'vit.safetensors'}", f"--to={tmp_path / 'a'}", "--family=swin")
    variant = _convert(f"--from={tmp_path / 'vit.safetensors'}", f"--to={tmp_path / 'b'}", "--variant=Ti/16")
    for done in (family, variant):
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert family.stderr.startswith("error: --family=swin, but these are vit weights (their keys are ['blocks.0.")
    assert variant.stderr.startswith("error: The checkpoint does not fit ViT-Ti/16: the weights are ViT-mu/4 (width "
                                     "64, depth 4, patch 4). Leave out --variant")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.smoke
def test_to_timm_reads_the_family_and_image_size_from_the_workdir(tmp_path):
    """A Swin run at 32 px (its weights alone would say 16: the smallest size its windows fill)."""
    run = str(tmp_path / "run")
    config = {"model.family": "swin", "model.variant": "mu/2", "data.image_size": 32}
    variables = _random_variables(swin.Swin(num_classes=5, variant="mu/2", block_size=8), 32)
    with checkpoint.Checkpoints(run) as checkpoints:  # what the trainer writes
        checkpoints.save({"step": jnp.asarray(1, jnp.int32), **variables})
    workdir.record_start(run, config)
    done = _convert("--to_timm", f"--from={run}", f"--to={tmp_path / 'swin.npz'}")
    assert done.returncode == 0, done.stderr
    assert f"swin mu/2 at 32 px, a head of 5 classes, as {run}/config.json records." in done.stdout
    assert ('model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, embed_dim=32, '
            'depths=(2, 2), num_heads=(2, 4), window_size=4, patch_size=2, img_size=32)\n'
            '  model.load_state_dict({k: torch.from_numpy(v) for k, v in numpy.load("'
            f'{tmp_path / "swin.npz"}").items()}})') in done.stdout
    with np.load(tmp_path / "swin.npz") as exported:
        np.testing.assert_array_equal(exported["layers.1.blocks.1.attn.relative_position_bias_table"],
                                      variables["params"]["layers_1_blocks_1"]["attn"]["relative_position_bias_table"])
    refused = _convert("--to_timm", f"--from={run}", f"--to={tmp_path / 'again.npz'}", "--family=vit")
    assert refused.returncode == 1 and refused.stderr.startswith(
        f"error: --family=vit, but {run}/config.json says model.family='swin'")


def _weights_of_no_family(tmp_path):
    np.savez(tmp_path / "bert.npz", **{"encoder.layer.0.attention.weight": np.zeros((2, 2), np.float32),
                                       "pooler.dense.bias": np.zeros(2, np.float32)})
    return [f"--from={tmp_path / 'bert.npz'}", f"--to={tmp_path / 'out'}"]


def _existing_target(tmp_path):
    np.savez(tmp_path / "w.npz", x=np.zeros(1))
    (tmp_path / "out").mkdir()
    return [f"--from={tmp_path / 'w.npz'}", f"--to={tmp_path / 'out'}"]


def _file(name):
    def arguments(tmp_path):
        (tmp_path / name).write_bytes(b"")
        return [f"--from={tmp_path / name}", f"--to={tmp_path / 'out'}"]
    return arguments


def _pytorch_file(tmp_path):
    (tmp_path / "no_torch").mkdir()  # on the command's path: a torch that fails to import, as a missing one
    (tmp_path / "no_torch" / "torch.py").write_text("raise ImportError('No module named torch')\n")
    (tmp_path / "w.pth").write_bytes(b"not read")
    return [f"--from={tmp_path / 'w.pth'}", f"--to={tmp_path / 'out'}"]


def _swin_without_tables(tmp_path):
    np.savez(tmp_path / "w.npz", **{"patch_embed.proj.weight": np.zeros((32, 3, 4, 4), np.float32)})
    return [f"--from={tmp_path / 'w.npz'}", f"--to={tmp_path / 'out'}", "--family=swin", "--variant=T/4"]


@pytest.mark.parametrize("arguments, message", [
    (lambda tmp_path: [f"--from={tmp_path / 'nowhere.safetensors'}", f"--to={tmp_path / 'out'}"],
     "error: No weight file at "),
    (_file("w.ckpt"), "error: Unknown weight format '.ckpt' of "),
    (_existing_target, "error: --to=.* exists; pick a new directory for the converted weights."),
    (_pytorch_file, "error: .*w.pth is a PyTorch file and torch is not installed; install torch, or convert"),
    (_swin_without_tables, r"error: The checkpoint does not fit Swin-T/4: missing keys \['layers.0.blocks.0"),
    (_weights_of_no_family, r"error: The weights are of none of the families \('vit', 'swin', 'resnet'.*\): "
                            r"their keys are \['encoder.layer.0.attention.weight', 'pooler.dense.bias'\]. For a"),
    (lambda tmp_path: ["--to_timm", f"--from={tmp_path}", f"--to={tmp_path / 'x.safetensors'}", "--variant=B/16"],
     "error: --variant do not go with --to_timm"),
    (lambda tmp_path: ["--to_timm", f"--from={tmp_path}", f"--to={tmp_path / 'x.pt'}"],
     "error: Write the timm weights as .safetensors or .npz, not "),
], ids=["missing", "unknown_format", "target_exists", "pth_without_torch", "swin_without_tables", "no_family",
        "to_timm_variant", "to_timm_format"])
def test_mistakes_end_in_one_line(arguments, message, tmp_path):
    done = _convert(*arguments(tmp_path), env={**os.environ, "PYTHONPATH": str(tmp_path / "no_torch")})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(message, lines[0]), done.stderr


def test_a_directory_without_metadata_still_exports_as_vit(tmp_path):
    """Directories converted before masksub_weights.json existed: ViT, as --family defaulted to."""
    model, size, _, _ = SMALL["vit"]
    variables = _random_variables(model, size)
    convert.save_variables(variables, str(tmp_path / "old"), family="vit", variant="mu/4", image_size=16)
    (tmp_path / "old" / init_from.METADATA).unlink()
    exported = convert.export_timm(str(tmp_path / "old"), str(tmp_path / "old.npz"))
    assert (exported["family"], exported["variant"], exported["image_size"]) == ("vit", "mu/4", 16)
    with np.load(tmp_path / "old.npz") as data:
        np.testing.assert_array_equal(data["head.weight"], variables["params"]["head"]["kernel"].T)
    assert weights.flatten(convert.read_params(str(tmp_path / "old"))).keys() == weights.flatten(
        variables["params"]).keys()


def test_weights_of_another_width_are_not_resampled_but_refused():
    """pos_embed of a wider model has the same token count: resampling it "from (1, 16, 192) to
    (1, 16, 192)" was said before the shapes were refused."""
    said = []
    loaded = {"pos_embed": np.zeros((1, 16, 192), np.float32)}
    initial = {"pos_embed": np.zeros((1, 16, 32), np.float32)}
    assert vit.fit(loaded, initial, said.append)["pos_embed"].shape == (1, 16, 192) and said == []
    with pytest.raises(weights.ConversionError, match=r"pos_embed"):
        convert.adapt_params(loaded, initial, family="vit", say=said.append)
