"""The user-code boundary: whatever the user's factory or functions do wrong becomes one
UserCodeError that names the function and what went wrong."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fedround.tasks.core.config import ModelConfig
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.core.usercode import (
    MAX_METRICS,
    SiteDataset,
    UserCodeError,
    build_user_model,
    call_user,
    check_metrics,
    load_callable,
    load_weights,
    resolve_model_config,
)

from . import user_code

PKG = user_code.__name__


def model_config(factory: str, **kwargs: object) -> ModelConfig:
    return ModelConfig.model_validate({"factory": f"{PKG}:{factory}", **kwargs})


# load_callable -----------------------------------------------------------------------------


def test_load_callable_imports_a_function_and_a_dotted_attribute() -> None:
    assert load_callable(f"{PKG}:tabular", "model factory") is user_code.tabular
    fromkeys = load_callable("collections:OrderedDict.fromkeys", "loader")
    assert fromkeys("ab") == collections.OrderedDict.fromkeys("ab")


def test_a_missing_module_says_to_install_the_package() -> None:
    with pytest.raises(UserCodeError) as info:
        load_callable("no_such_package_4711.models:build", "model factory")
    message = str(info.value)
    assert message.startswith("model factory no_such_package_4711.models:build: cannot import")
    assert "'no_such_package_4711.models'" in message
    assert "pip install" in message and "every site" in message


def test_a_missing_attribute_is_named() -> None:
    with pytest.raises(
        UserCodeError, match=rf"train function {PKG}:trian: module '{PKG}' has no 'trian'"
    ):
        load_callable(f"{PKG}:trian", "train function")


def test_something_not_callable_is_refused() -> None:
    with pytest.raises(UserCodeError, match=r"'NOT_CALLABLE' is not callable"):
        load_callable(f"{PKG}:NOT_CALLABLE", "evaluate function")


def test_a_path_without_a_colon_is_refused() -> None:
    with pytest.raises(UserCodeError, match=r"expected 'package\.module:function'"):
        load_callable("my_package.models", "model factory")


def test_a_module_that_fails_to_import_is_reported_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "broken_user_module_4711.py"
    path.write_text("VALUE = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        UserCodeError, match=r"importing 'broken_user_module_4711' raised ZeroDivisionError"
    ):
        load_callable("broken_user_module_4711:build", "model factory")


def test_user_code_errors_are_fedround_errors() -> None:
    assert issubclass(UserCodeError, FedroundError)


# build_user_model ----------------------------------------------------------------------------


def test_a_factory_that_raises_names_the_import_path_and_arguments() -> None:
    with pytest.raises(UserCodeError) as info:
        build_user_model(model_config("raises", width=7), seed=0)
    assert str(info.value) == (
        f"model factory {PKG}:raises(width=7) raised ValueError: width 7 is not supported"
    )


def test_a_factory_returning_something_else_than_a_module_is_refused() -> None:
    with pytest.raises(
        UserCodeError, match=rf"{PKG}:not_a_module returned dict, not a torch.nn.Module"
    ):
        build_user_model(model_config("not_a_module"), seed=0)


def test_a_module_without_parameters_is_refused() -> None:
    with pytest.raises(UserCodeError, match=r"returned a module with no parameters"):
        build_user_model(model_config("no_parameters"), seed=0)


def test_wrong_keyword_arguments_are_reported_as_the_factory_failing() -> None:
    with pytest.raises(
        UserCodeError, match=rf"model factory {PKG}:fixed_size\(depth=2\) raised TypeError"
    ):
        build_user_model(model_config("fixed_size", depth=2), seed=0)


def test_the_same_seed_builds_the_same_weights_and_leaves_the_global_rng_alone() -> None:
    # Prepare
    config = model_config("tabular", in_features=5, out_features=3)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)

    # Execute
    first = build_user_model(config, seed=9).state_dict()
    after = torch.rand(3)
    second = build_user_model(config, seed=9).state_dict()
    other = build_user_model(config, seed=10).state_dict()

    # Assert
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["0.weight"], other["0.weight"])
    assert torch.equal(after, expected_next)


def test_builtin_factories_are_built_by_name() -> None:
    config = ModelConfig(factory="logistic_regression", in_features=4, out_features=2)  # type: ignore[call-arg]
    model = build_user_model(config, seed=0)
    assert isinstance(model, nn.Linear) and tuple(model.weight.shape) == (2, 4)


# resolve_model_config ------------------------------------------------------------------------


def test_resolve_fills_in_and_out_features_when_accepted_and_unset() -> None:
    resolved = resolve_model_config(model_config("tabular", width=8), 11, 3)
    assert resolved.kwargs == {"width": 8, "in_features": 11, "out_features": 3}
    assert resolved.factory == f"{PKG}:tabular"


def test_resolve_keeps_values_the_config_sets() -> None:
    resolved = resolve_model_config(model_config("tabular", in_features=20), 11, 3)
    assert resolved.kwargs == {"in_features": 20, "out_features": 3}


def test_resolve_leaves_factories_that_do_not_take_them() -> None:
    config = model_config("fixed_size")
    assert resolve_model_config(config, 11, 3) is config
    cnn = ModelConfig(factory="mnist_cnn")
    assert "in_features" not in resolve_model_config(cnn, 784, 10).kwargs


def test_resolve_fills_factories_taking_any_keyword() -> None:
    resolved = resolve_model_config(model_config("any_kwargs"), 11, 3)
    assert resolved.kwargs == {"in_features": 11, "out_features": 3}


def test_resolve_skips_unknown_sizes() -> None:
    resolved = resolve_model_config(model_config("tabular"), None, 3)
    assert resolved.kwargs == {"out_features": 3}


def test_a_resolved_builtin_compares_equal_to_one_written_out() -> None:
    resolved = resolve_model_config(ModelConfig(factory="mlp"), 6, 2)
    written = ModelConfig.model_validate(
        {"factory": "mlp", "in_features": 6, "out_features": 2, "hidden": [64, 32]}
    )
    assert resolved == written


# load_weights --------------------------------------------------------------------------------


def test_load_weights_copies_matching_tensors() -> None:
    model = nn.Linear(2, 1)
    load_weights(model, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, "pkg:f")
    assert model.weight.detach().tolist() == [[1.0, 1.0]]


def test_a_weights_mismatch_names_the_factory_and_the_tensors() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(UserCodeError) as info:
        load_weights(model, {"weight": torch.zeros(1, 3), "extra": torch.zeros(1)}, "pkg.m:build")
    message = str(info.value)
    assert message.startswith("model factory pkg.m:build builds parameters that do not match")
    assert "missing ['bias']" in message
    assert "unexpected ['extra']" in message
    assert "weight (1, 2) vs (1, 3)" in message


# check_metrics -------------------------------------------------------------------------------


def test_metrics_become_floats() -> None:
    raw = {"loss": torch.tensor(0.5), "acc.top-1": 1, "f1_macro": 0.25}
    assert check_metrics(raw, "f") == {"loss": 0.5, "acc.top-1": 1.0, "f1_macro": 0.25}
    assert check_metrics(None, "f") == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"loss": float("nan")}, r"evaluate function p:e returned metric 'loss' = nan: not finite"),
        ({"loss": float("-inf")}, r"metric 'loss' = -inf: not finite"),
        ({"loss": "low"}, r"metric 'loss' = 'low', not a number"),
        ({"loss": [1.0]}, r"metric 'loss' = \[1.0\], not a number"),
        ([("loss", 1.0)], r"returned list, not a dict of metrics"),
        (0.5, r"returned float, not a dict of metrics"),
        ({"bad name": 1.0}, r"a metric named 'bad name'"),
        ({"1st": 1.0}, r"a metric named '1st'"),
        ({3: 1.0}, r"a metric named 3"),
        ({"x" * 65: 1.0}, r"a metric named 'x{65}'"),
        ({f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}, rf"returned {MAX_METRICS + 1} metrics"),
    ],
)
def test_bad_metrics_are_refused(raw: object, message: str) -> None:
    with pytest.raises(UserCodeError, match=message):
        check_metrics(raw, "evaluate function p:e")


# call_user and SiteDataset -------------------------------------------------------------------


def test_call_user_wraps_what_the_function_raises() -> None:
    def broken(x: int) -> int:
        raise KeyError(x)

    with pytest.raises(UserCodeError, match=r"^train function p:t raised KeyError: 3$") as info:
        call_user(broken, "train function p:t", 3)
    assert isinstance(info.value.__cause__, KeyError)
    assert call_user(lambda a, b: a + b, "f", 1, 2) == 3


def test_call_user_passes_user_code_errors_through_unchanged() -> None:
    def timed_out() -> None:
        raise UserCodeError("train function p:t did not finish")

    with pytest.raises(UserCodeError, match=r"^train function p:t did not finish$"):
        call_user(timed_out, "ignored")


def test_site_dataset_batches_cover_every_example_once_reproducibly() -> None:
    data = SiteDataset(torch.arange(10.0)[:, None], torch.arange(10))
    first = [y.tolist() for _, y in data.batches(4, seed=3)]
    again = [y.tolist() for _, y in data.batches(4, seed=3)]
    assert first == again
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert [y.tolist() for _, y in data.batches(4, shuffle=False)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    assert len(data) == data.num_examples == 10


def test_a_user_function_that_exits_is_an_error_not_an_exit() -> None:
    # A script adapted into a train function may still call sys.exit: the site is left out
    # of the round; the site's process (and, embedded, the coordinator's task) carries on.
    def exits() -> None:
        sys.exit(3)

    with pytest.raises(UserCodeError, match=r"^train function p:t raised SystemExit: 3$"):
        call_user(exits, "train function p:t")


def test_a_factory_or_module_that_exits_is_an_error_not_an_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UserCodeError, match=r"exits\(\) raised SystemExit: usage: build"):
        build_user_model(model_config("exits"), seed=0)
    (tmp_path / "exiting_user_script_4711.py").write_text("import sys\nsys.exit(2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        UserCodeError, match=r"importing 'exiting_user_script_4711' raised SystemExit"
    ):
        load_callable("exiting_user_script_4711:build", "model factory")
