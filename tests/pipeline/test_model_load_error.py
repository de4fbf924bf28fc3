"""pipeline.run recognises a model actor that could not be constructed by Ray's exception type
(RayActorError.actor_init_failed), wherever it sits in the chain, and nothing else as one. The
end-to-end case (an empty model folder, exit code 3) is tests/pipeline/test_run_models.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.exceptions import RayActorError

from pipeline.run import ModelLoadError, _model_load_error


def init_failure() -> RayActorError:
    return RayActorError(actor_init_failed=True, error_msg="The actor died because of an error raised in its "
                         "creation task:\nOSError: no config.json in /models/empty")


def test_an_actor_that_failed_construction_is_a_model_load_error() -> None:
    error = _model_load_error(init_failure())
    assert isinstance(error, ModelLoadError)
    assert "could not be loaded by any actor" in str(error) and "OSError: no config.json" in str(error)


def test_it_is_found_as_the_cause_of_another_error() -> None:
    try:
        try:
            raise init_failure()
        except RayActorError as cause:
            raise RuntimeError("dataset execution failed") from cause
    except RuntimeError as wrapped:
        assert isinstance(_model_load_error(wrapped), ModelLoadError)


def test_an_actor_that_dies_later_or_a_message_that_names_construction_is_not() -> None:
    assert _model_load_error(RayActorError(error_msg="the actor died unexpectedly (OOM kill)")) is None
    assert _model_load_error(ValueError("ModelStage.__init__ creation task ActorDiedError")) is None


def test_an_actor_whose_engine_fingerprint_differs_from_the_drivers_refuses_to_start(tmp_path: Path) -> None:
    """The driver planned its resume with its own fingerprint; an actor running other code or
    settings would stamp rows that the next resume counts as done for the wrong engine."""
    from pipeline._model import ModelStage, model_stage_kwargs, run_fingerprint
    from pipeline.config import load_job

    cfg = load_job(Path(__file__).resolve().parents[2] / "jobs" / "caption.yaml", ["preset=offline", f"model.cache_dir={tmp_path}"])
    stage = ModelStage("run-1", run_fingerprint(cfg), **model_stage_kwargs(cfg))  # the same: it starts
    assert stage.worker.loaded.provenance["engine_fingerprint"] == run_fingerprint(cfg)
    with pytest.raises(RuntimeError, match=r"engine fingerprint: this actor computes \w{16}, the driver 0{16}"):
        ModelStage("run-1", "0" * 16, **model_stage_kwargs(cfg))
