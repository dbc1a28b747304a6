"""`--replicas MODEL=N` / `MODEL=NxK` (TINKERD_REPLICAS): parsed, and refused with the spec
named when malformed or naming a model that is not served."""

import pytest

from tinkerd.config import ReplicaCount, Settings, parse_replica_count


def test_counts_and_devices_are_parsed() -> None:
    assert parse_replica_count("Qwen/Qwen3-8B=4") == ReplicaCount("Qwen/Qwen3-8B", 4, 1)
    assert parse_replica_count("Qwen/Qwen3-8B=1x2") == ReplicaCount("Qwen/Qwen3-8B", 1, 2)
    assert parse_replica_count(" m = 2X8 ") == ReplicaCount("m", 2, 8)


@pytest.mark.parametrize("spec", ["m", "=2", "m=", "m=0", "m=2x0", "m=x2", "m=two", "m=2x"])
def test_malformed_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="expected MODEL=N or MODEL=NxK"):
        parse_replica_count(spec)


def test_replicas_must_name_a_served_model(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, models=["a", "b"], replicas=["b=2", "a=1x2"])
    assert settings.replica_counts() == {"b": ReplicaCount("b", 2), "a": ReplicaCount("a", 1, 2)}
    with pytest.raises(ValueError, match="'c' is not a served model"):
        Settings(data_dir=tmp_path, models=["a"], replicas=["c=2"]).replica_counts()
    assert Settings(data_dir=tmp_path, models=["a"]).replica_counts() == {}
