"""``registry.url`` / ``endpoint_url`` / ``region``: syntax refused at load, an unusable object store refused at start
(``config check``, ``run``, ``serve``, ``registry …``) with exit 2 naming the setting, against moto's real server."""

from __future__ import annotations

import socket

import pytest

from daemon.pipeline.config import ConfigError, load_config
from tests.s3_harness import S3Endpoint, moto_endpoint, s3  # noqa: F401 - fixtures


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("env", "setting", "message"), [
    ({"UNLEARND_REGISTRY_URL": "gs://bucket/p"}, "registry.url", "scheme must be file:// or s3://"),
    ({"UNLEARND_REGISTRY_URL": "s3://Bad_Bucket/p"}, "registry.url", "not a valid S3 bucket name"),
    ({"UNLEARND_REGISTRY_URL": "s3://bucket/a/../b"}, "registry.url", "'..'"),
    ({"UNLEARND_REGISTRY_URL": "s3://bucket", "UNLEARND_REGISTRY_ENDPOINT_URL": "ftp://h:1"},
     "registry.endpoint_url", "must be http"),
])
def test_a_malformed_registry_url_is_refused_naming_the_setting(env, setting, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, env=env)
    assert info.value.setting.startswith(setting)


def test_registry_settings_come_from_the_toml_and_the_environment_wins(tmp_path):
    path = tmp_path / "u.toml"
    path.write_text('[registry]\nurl = "s3://from-file/p"\nendpoint_url = "http://127.0.0.1:9000"\nregion = "eu-west-1"\n'
                    '[[models]]\nname = "m"\ndataset = "mnist"\n')
    config = load_config(path, env={"UNLEARND_REGISTRY_URL": "s3://from-env/q"})
    assert (config.registry.url, config.registry.endpoint_url, config.registry.region) == \
        ("s3://from-env/q", "http://127.0.0.1:9000", "eu-west-1")
    from daemon.registry.mirror import resolve_registry
    assert resolve_registry("file:///srv/reg", "var/registry")[0].as_posix() == "/srv/reg"


def _config_file(tmp_path, url: str, endpoint: str) -> str:
    path = tmp_path / "u.toml"
    path.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n[registry]\ndir = "{tmp_path / "reg"}"\n'
                    f'url = "{url}"\nendpoint_url = "{endpoint}"\n'
                    f'[[models]]\nname = "mnist-cnn"\ndataset = "mnist"\n')
    return str(path)


def test_an_unusable_object_store_is_exit_2_naming_the_setting(tmp_path, capsys, s3):
    from daemon.cli import main

    cases = [  # (url, endpoint, setting named, words)
        (f"s3://{s3.bucket}/reg", f"http://127.0.0.1:{_free_port()}", "registry.endpoint_url", "cannot reach"),
        ("s3://no-such-bucket-here/reg", s3.endpoint_url, "registry.url", "does not exist"),
    ]
    for url, endpoint, setting, words in cases:
        for argv in (["config", "check"], ["run"]):
            assert main([*argv, "--config", _config_file(tmp_path, url, endpoint)]) == 2, argv
            err = capsys.readouterr().err
            assert setting in err and words in err, (argv, err)
        for argv in (["serve", "--model", "m", "--port", "0"], ["registry", "list", "--model", "m"]):
            code = main([*argv, "--registry", url, "--s3-endpoint-url", endpoint,
                         "--cache-dir", str(tmp_path / "cache")])
            err = capsys.readouterr().err
            assert code == 2 and setting in err and words in err, (argv, err)
    assert not (tmp_path / "state" / "ledger.sqlite").exists()
    assert main(["config", "check", "--config", _config_file(tmp_path, f"s3://{s3.bucket}/reg", s3.endpoint_url)]) == 0
    assert f"registry s3://{s3.bucket}/reg" in capsys.readouterr().out


def test_a_rounds_push_waits_out_an_unreachable_store_and_a_stop_leaves_it_to_the_recovery(tmp_path, s3,
                                                                                        monkeypatch):
    from daemon.pipeline import bucket
    from daemon.registry import write_version
    from daemon.registry.mirror import RegistryMirror
    from daemon.registry.remote import S3Location, make_client
    from tests.test_registry_s3 import CLASSES, NAME, SHAPE, tiny_model

    monkeypatch.setattr(bucket, "RETRY_FIRST_S", 0.01)
    v = write_version(tmp_path, NAME, tiny_model(), input_shape=SHAPE, classes=CLASSES, parent=None,
                      export_pt2=False).version
    down = make_client(f"http://127.0.0.1:{_free_port()}")          # nothing listens there
    mirror = RegistryMirror(down, S3Location(s3.bucket, "p/"), tmp_path)
    asked = []

    def back_after_two() -> bool:      # the store comes back while the round waits
        asked.append(1)
        if len(asked) == 2:
            mirror.client = s3.client()
        return False

    bucket.mirror_publish(mirror, NAME, v, should_abort=back_after_two)
    assert len(asked) == 2 and mirror.latest(NAME) == v
    mirror.client = down
    with pytest.raises(bucket.RegistryUnavailable, match=r"registry\.url s3://.*cannot push"):
        bucket.mirror_publish(mirror, NAME, v, should_abort=lambda: True)     # a stop: the recovery finishes it
    with pytest.raises(bucket.RegistryUnavailable):
        bucket.mirror_publish(mirror, NAME, v)                               # the recovery's one attempt
