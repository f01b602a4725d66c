"""Platform detection with Apple's jax-metal plugin mocked (no Apple hardware here), and the FLOP/s table."""

import jax
import pytest

from smedjan import hardware


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(hardware, "_started", None)
    return monkeypatch


def _with_plugin(monkeypatch, installed: bool):
    real = hardware._version
    monkeypatch.setattr(
        hardware, "_version", lambda p: ("0.1.1" if installed else None) if p == "jax-metal" else real(p)
    )
    monkeypatch.setattr(hardware.metadata, "requires", lambda p: ["jaxlib==0.4.34", "jax==0.4.34"])


def test_a_metal_plugin_that_fails_to_load_is_one_line_and_cpu(fresh, capsys):
    _with_plugin(fresh, installed=True)
    calls = {"n": 0, "platforms": None}

    def default_backend():
        calls["n"] += 1
        if calls["platforms"] != "cpu":
            raise RuntimeError(
                "Unable to initialize backend 'METAL': INVALID_ARGUMENT: Mismatched PJRT plugin PJRT API version "
                "(0.47) and framework PJRT API version 0.75). (you may need to uninstall the failing plugin "
                "package, or set JAX_PLATFORMS=cpu to skip this backend.)"
            )
        return "cpu"

    fresh.setattr(jax, "default_backend", default_backend)
    fresh.setattr(jax.config, "update", lambda k, v: calls.update(platforms=v) if k == "jax_platforms" else None)
    from jax._src import xla_bridge

    fresh.setattr(xla_bridge, "_clear_backends", lambda: None)
    assert hardware.start_platform() == "cpu"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "jax-metal 0.1.1 (it requires jaxlib==0.4.34) did not load beside jaxlib" in err
    assert "Mismatched PJRT plugin PJRT API version" in err and "running on CPU" in err
    assert hardware.start_platform() == "cpu" and calls["n"] == 2  # resolved once per process


def test_metal_when_the_plugin_loads(fresh, capsys):
    _with_plugin(fresh, installed=True)
    fresh.setattr(jax, "default_backend", lambda: "METAL")
    assert hardware.start_platform() == hardware.METAL
    assert capsys.readouterr().err == ""
    assert hardware.xla_only("METAL") and not hardware.xla_only("gpu") and not hardware.xla_only("cpu")


def test_no_plugin_no_message_and_other_errors_still_raise(fresh, capsys):
    _with_plugin(fresh, installed=False)
    assert hardware.start_platform() == jax.default_backend().lower()
    assert capsys.readouterr().err == ""
    hardware._started = None

    def broken():
        raise RuntimeError("Unable to initialize backend 'cuda': no driver")

    fresh.setattr(jax, "default_backend", broken)
    with pytest.raises(RuntimeError, match="cuda"):
        hardware.start_platform()


def test_peak_flops_table():
    assert hardware.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_flops_for("NVIDIA H200") == 989e12
    assert hardware.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert hardware.peak_flops_for("cpu") is None and hardware.peak_flops_for("") is None


def test_metal_routes_every_path_to_xla(monkeypatch):
    from smedjan.backend import settings
    from smedjan.errors import UserError

    metal = settings("METAL")
    assert (metal.platform, metal.attn_impl, metal.decode_impl, metal.prefill_impl) == ("metal", "xla", "xla", "xla")
    assert settings("metal", attn_impl="auto", decode_impl="xla").attn_impl == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "METAL")  # what jax-metal reports
    assert settings().platform == "metal" and settings().decode_impl == "xla"
    for field, impl in (("attn_impl", "pallas"), ("attn_impl", "cudnn"), ("decode_impl", "pallas_fused")):
        with pytest.raises(UserError, match=f"{field} '{impl}' is not available on Apple's Metal backend"):
            settings(**{field: impl})


def test_sampling_flags_are_named_as_flags(capsys, tmp_path):
    from smedjan.cli import main

    for argv, flag in (
        (["generate", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens"),
        (["generate", str(tmp_path), "--prompt", "hi", "--top-p", "0"], "--top-p"),
        (["chat", str(tmp_path), "--temperature", "-1"], "--temperature"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"error: {flag} must be" in err and "max_tokens" not in err and str(tmp_path) not in err
