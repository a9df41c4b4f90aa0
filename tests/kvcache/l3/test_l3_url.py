"""`--l3` values: the three accepted forms (redis and mooncake with one server or several) and a clear
error for everything else."""

import pytest

from hisa.errors import ConfigError
from hisa.kvcache.l3 import FileL3Spec, MooncakeL3Spec, RedisL3Spec, parse_l3_url


@pytest.mark.parametrize("url, spec", [
    ("file:/var/cache/hisa", FileL3Spec("/var/cache/hisa")),
    ("file:relative/dir", FileL3Spec("relative/dir")),
    ("file:///abs/dir", FileL3Spec("/abs/dir")),
    ("redis://127.0.0.1:6379", RedisL3Spec("127.0.0.1", 6379, 0)),
    ("redis://cache.local:7000/3", RedisL3Spec("cache.local", 7000, 3)),
    ("REDIS://[::1]:6379", RedisL3Spec("::1", 6379, 0)),
    ("redis://a:6379,b:6380,a:6381/2", RedisL3Spec("a", 6379, 2, others=(("b", 6380), ("a", 6381)))),
    ("redis://[::1]:6379,[::1]:6380", RedisL3Spec("::1", 6379, 0, others=(("::1", 6380),))),
    ("mooncake://10.0.0.5:50051", MooncakeL3Spec("10.0.0.5", 50051, "http://10.0.0.5:8080/metadata")),
    ("mooncake://127.0.0.1:50051?metadata=http://127.0.0.1:9000/metadata",
     MooncakeL3Spec("127.0.0.1", 50051, "http://127.0.0.1:9000/metadata")),
    ("mooncake://10.0.0.5:50051?client=127.0.0.1:50052",
     MooncakeL3Spec("10.0.0.5", 50051, "http://10.0.0.5:8080/metadata", client="127.0.0.1:50052")),
    ("mooncake://10.0.0.5:50051?client=localhost:50052&pool_gb=8",
     MooncakeL3Spec("10.0.0.5", 50051, "http://10.0.0.5:8080/metadata", client="localhost:50052", pool_gb=8.0)),
    ("mooncake://a:1,b:2", MooncakeL3Spec("a", 1, "http://a:8080/metadata",
                                          others=(MooncakeL3Spec("b", 2, "http://b:8080/metadata"),))),
    ("mooncake://h:1,h:2?metadata=http://h:81/m,http://h:82/m&client=h:11,h:12&pool_gb=2",
     MooncakeL3Spec("h", 1, "http://h:81/m", client="h:11", pool_gb=2.0,
                    others=(MooncakeL3Spec("h", 2, "http://h:82/m", client="h:12", pool_gb=2.0),))),
])
def test_accepted_forms(url, spec):
    assert parse_l3_url(url) == spec


@pytest.mark.parametrize("url, says", [
    ("", "empty"),
    ("/tmp/dir", "no scheme"),
    ("file:", "directory is missing"),
    ("s3://bucket/x", "unknown scheme 's3'"),
    ("redis:127.0.0.1:6379", "redis://HOST:PORT"),
    ("redis://127.0.0.1", "host and a port"),
    ("redis://:6379", "host and a port"),
    ("redis://127.0.0.1:port", "not a number"),
    ("redis://127.0.0.1:70000", "not a number"),
    ("redis://127.0.0.1:6379/db1", "database"),
    ("redis://127.0.0.1:6379,127.0.0.1:6379", "named twice"),
    ("redis://127.0.0.1:6379,", "host and a port"),
    ("redis://127.0.0.1:6379,127.0.0.1", "host and a port"),
    ("redis://127.0.0.1:6379,127.0.0.1:6380?x=1", "no options"),
    ("mooncake://127.0.0.1:50051?segment=1", "unknown option"),
    ("mooncake://127.0.0.1:50051/x", "no path"),
    ("mooncake://127.0.0.1:50051?client=127.0.0.1", "host and a port"),
    ("mooncake://127.0.0.1:50051?pool_gb=8", "add client="),
    ("mooncake://127.0.0.1:50051?client=h:1&pool_gb=lots", "number of GB"),
    ("mooncake://127.0.0.1:50051?client=h:1&pool_gb=0", "between"),
    ("mooncake://h:1,h:1", "named twice"),
    ("mooncake://h:1,h:2?metadata=http://h:81/m", "one URL per master"),
    ("mooncake://h:1,h:2?client=h:11", "one store process per master"),
    ("mooncake://h:1,h:2?metadata=http://h:81/m,&client=h:11,h:12", "none empty"),
])
def test_rejected_forms_say_what_to_use(url, says):
    with pytest.raises(ConfigError, match=says):
        parse_l3_url(url)


def test_engine_config_checks_l3_before_loading_anything():
    from hisa.config import EngineConfig

    assert EngineConfig(device="cpu").l3 is None              # off by default
    with pytest.raises(ConfigError, match="unknown scheme"):
        EngineConfig(device="cpu", l3="s3://bucket")
    with pytest.raises(ConfigError, match="needs l3"):
        EngineConfig(device="cpu", l3_gb=4.0)


def test_cli_passes_l3_flags():
    from hisa.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(["generate", "--prompt", "hi", "--l3", "file:/tmp/x", "--l3-gb", "2"])
    kw = engine_kwargs(args)
    assert (kw["l3"], kw["l3_gb"]) == ("file:/tmp/x", 2.0)
