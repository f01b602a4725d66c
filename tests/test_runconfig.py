"""The run configuration: one object filled by flags, recipes and the API, checked once, errors naming the field."""

import dataclasses
import json

import pytest

from smedjan import runconfig
from smedjan.cli import build_parser, main
from smedjan.runconfig import OptimConfig, RunConfig, RunConfigError, from_dict


def _args(*argv):
    return build_parser().parse_args(["train", *argv])


def test_flat_nested_and_dotted_keys_fill_the_same_fields():
    flat = from_dict({"lr": 1e-3, "warmup_steps": 5, "schedule": "wsd", "mesh": "data=1", "no_such": None})
    nested = from_dict(
        {"optim": {"lr": 1e-3}, "schedule": {"warmup_steps": 5, "kind": "wsd"}, "mesh": {"shape": "data=1"}}
    )
    dotted = from_dict({"optim.lr": 1e-3, "schedule.warmup_steps": 5, "schedule.kind": "wsd", "mesh.shape": "data=1"})
    assert flat == nested == dotted
    assert flat.optim.lr == 1e-3 and flat.schedule.kind == "wsd" and flat.mesh.shape == "data=1"
    assert flat.optim.b1 == OptimConfig().b1  # everything else keeps its default
    # the nested dict written to run_config.json reads back to the same config
    assert from_dict(json.loads(json.dumps(flat.to_dict()))) == flat


def test_every_field_has_one_flag_and_flags_reach_the_config():
    rc = runconfig.from_args(
        _args("--lr", "0.01", "--schedule", "constant", "--no-export", "--no-progress", "--resume", "--dim", "64")
    )
    assert rc.optim.lr == 0.01 and rc.schedule.kind == "constant"
    assert rc.ckpt.export is False and rc.log.progress is False and rc.ckpt.resume is True
    assert rc.model.overrides == {"hidden_size": 64, "head_dim": 0}
    assert runconfig.from_args(_args()) == RunConfig()  # no flags: the defaults, nothing else
    flags = [runconfig.flag_of(f) for _, f, _, _ in runconfig._walk(RunConfig()) if f.name != "overrides"]
    assert len(flags) == len(set(flags))
    parsed = vars(_args())
    assert all(runconfig.flat_name(f) in parsed for _, f, _, _ in runconfig._walk(RunConfig()) if f.name != "overrides")


def test_recipe_then_flags_then_api_merge():
    rc = from_dict({"lr": 2e-3, "steps": 50, "dim": 96}, source="r.json")
    rc2 = rc.merge({"steps": 7, "layers": 3})
    assert (rc2.optim.lr, rc2.steps) == (2e-3, 7)
    assert rc2.model.overrides == {"hidden_size": 96, "num_hidden_layers": 3, "head_dim": 0}
    rc3 = dataclasses.replace(rc2, optim=dataclasses.replace(rc2.optim, lr=5e-4))  # the Python API
    assert rc3.validate().optim.lr == 5e-4


@pytest.mark.parametrize(
    "updates, message",
    [
        ({"lr": 0}, "optim.lr (--lr): must be > 0, got 0.0"),
        ({"steps": -3}, "steps (--steps): must be > 0, got -3"),
        ({"steps": "500"}, "steps (--steps): expected an integer, got '500'"),
        ({"steps": 2.5}, "steps (--steps): expected an integer"),
        ({"val_fraction": 1.0}, "data.val_fraction (--val-fraction): must be in [0, 1)"),
        ({"schedule": "linear"}, "schedule.kind (--schedule): must be one of cosine, wsd, constant"),
        ({"stream": "yes"}, "data.stream (--stream): expected true or false"),
        ({"keep": 0}, "ckpt.keep (--keep): must be > 0"),
        ({"dim": -5}, "model.overrides.hidden_size (--dim): must be an integer > 0"),
        ({"optim": {"learning_rate": 1}}, "optim.learning_rate: unknown option"),
        ({"lerning_rate": 1}, "lerning_rate: unknown option"),
        ({"batch_size": 6, "grad_accum": 4}, "must divide by grad_accum"),
        ({"objective": {"name": "nope"}}, "objective: expected one of lm"),
    ],
)
def test_bad_values_name_the_field(updates, message):
    with pytest.raises(RunConfigError) as e:
        from_dict(updates, source="recipe.json")
    assert str(e.value).startswith("recipe.json: ") and message in str(e.value)


def test_the_api_is_validated_too():
    bad = dataclasses.replace(RunConfig(), optim=OptimConfig(lr=-1.0))
    with pytest.raises(RunConfigError, match=r"optim\.lr \(--lr\): must be > 0"):
        bad.validate()
    with pytest.raises(RunConfigError, match=r"steps \(--steps\): expected an integer, got '10'"):
        RunConfig(steps="10").validate()


def test_objectives_plug_in_their_own_section():
    @runconfig.register_objective
    @dataclasses.dataclass(frozen=True)
    class Distill:
        name = "test-distill"
        temperature: float = runconfig.opt(1.0, check="positive")

    Distill.name = "test-distill"
    try:
        rc = from_dict({"objective": {"name": "test-distill", "temperature": 2.0}})
        assert rc.objective == Distill(temperature=2.0)
        assert rc.to_dict()["objective"] == {"name": "test-distill", "temperature": 2.0}
        with pytest.raises(RunConfigError, match=r"objective\.temperature: must be > 0"):
            from_dict({"objective": {"name": "test-distill", "temperature": 0}})
    finally:
        del runconfig.OBJECTIVES["test-distill"]


def test_cli_nonsense_is_rejected_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--corpus", "bundled", "--steps", "-3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "steps (--steps): must be > 0, got -3" in err and "Traceback" not in err
    assert not out.exists()
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"optim": {"lr": -1}}))
    assert main(["train", "--recipe", str(recipe), "--corpus", "bundled", "--out", str(out)]) == 1
    assert f"--recipe {recipe}: optim.lr (--lr): must be > 0" in capsys.readouterr().err
