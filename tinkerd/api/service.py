"""What each endpoint does, between HTTP (routes.py) and the store and engine: the resource
families (training, sampling, checkpoints) put together, and the replay of logged requests
after a restart.

Every request that returns a future follows one path (`service_base.py`): validate (4xx on
bad input) → store the future durably → hand an `Op` to the base model's scheduler → return
the request_id. The op's callbacks, run on the scheduler thread, encode the result as the SDK
expects (protobuf for forward/backward and sample results, JSON otherwise), store it, and
wake the long-pollers.
"""

import json
from collections.abc import Callable

from tinkerd.api.sampling_service import SamplingService
from tinkerd.api.service_base import (
    replaying,
)
from tinkerd.api.service_types import ApiError, Future, not_found
from tinkerd.api.training_service import TrainingService
from tinkerd.store.records import FutureRecord

__all__ = ["ApiError", "Future", "Service", "not_found"]

# A zstd frame; a valid ForwardBackwardRequest starts with field 1 (model_id, byte 0x0a).
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Service(TrainingService, SamplingService):
    def replay(self, rec: FutureRecord) -> None:
        """Queue a logged request again, exactly as it was first handled (see `_submit`).
        A request refused now fails its future (if pending) and moves its run past it."""
        token = replaying.set(rec)
        try:
            self._dispatch(rec)
        except (ApiError, KeyError, ValueError) as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            self.fail_unfinished(rec, f"could not be re-run after a restart: {message}")
            if rec.model_id is not None and rec.seq_id is not None:
                for scheduler in self.schedulers.values():
                    scheduler.skip(rec.model_id, rec.seq_id)
        finally:
            replaying.reset(token)

    def _dispatch(self, rec: FutureRecord) -> None:
        if rec.kind == "forward_backward":
            encoding = "zstd" if rec.request[:4] == ZSTD_MAGIC else None
            self.forward_backward(rec.user, rec.request, encoding)
            return
        body = json.loads(rec.request)
        handlers: dict[str, Callable[[], object]] = {
            "create_model": lambda: self.create_model(rec.user, body),
            "optim_step": lambda: self.optim_step(rec.user, body),
            "save_weights": lambda: self.save_weights(rec.user, body, for_sampler=False),
            "save_weights_for_sampler": lambda: self.save_weights(rec.user, body, for_sampler=True),
            "save_weights_external": lambda: self.save_weights_external(rec.user, body),
            "load_weights": lambda: self.load_weights(rec.user, body),
            "sample": lambda: self.sample(rec.user, body),
        }
        if rec.kind not in handlers:
            raise ApiError(400, f"requests of kind {rec.kind!r} are not re-run")
        handlers[rec.kind]()
