"""SIGTERM with work in flight: a connected SDK client, a queued request that cannot run yet
(its seq_id waits for an earlier one) and a long-poll on it. The server must still exit
cleanly and promptly (`run_server` checks the exit on leaving the block)."""

import threading
import time
from pathlib import Path

import httpx
from e2e_helpers import run_server, sft_datum
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto


def test_sigterm_with_work_in_flight(tiny_model_dir: Path, tmp_path: Path) -> None:
    polls: list[object] = []
    with run_server(tiny_model_dir, tmp_path) as srv:
        sc = srv.client("tml-shutdown")
        tc = sc.create_lora_training_client(base_model=srv.model, rank=4).result()
        tc.forward_backward([sft_datum([1, 2, 3])], "cross_entropy").result()  # seq 1

        # seq 5 waits for 2..4, which never come.
        req = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(
                [sft_datum([4, 5, 6])], "cross_entropy"
            ),
            model_id=tc.model_id,
            seq_id=5,
        )
        http = httpx.Client(
            base_url=srv.base_url + "/api/v1", headers={"X-API-Key": "tml-shutdown"}, timeout=30
        )
        r = http.post(
            "/forward_backward",
            content=forward_backward_request_to_proto(req).SerializeToString(),
            headers={"Content-Type": "application/x-protobuf"},
        )
        r.raise_for_status()
        request_id = r.json()["request_id"]

        def poll() -> None:
            try:
                polls.append(
                    http.post(
                        "/retrieve_future",
                        json={"request_id": request_id, "allow_metadata_only": False},
                    ).json()
                )
            except httpx.HTTPError as exc:
                polls.append(exc)

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.5)  # the long-poll is now parked on the server
        started = time.monotonic()
    # run_server sent SIGTERM and verified a clean exit within its limit.
    assert time.monotonic() - started < 20
    poller.join(timeout=10)
    assert not poller.is_alive()
    # The long-poll was answered (try_again) or cut off by the shutdown; never a result.
    assert len(polls) == 1
    assert not isinstance(polls[0], dict) or polls[0].get("type") == "try_again", polls
