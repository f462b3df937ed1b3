"""The daemon's side of sources: config entries, start-up refusals naming the setting, refs in the codec
(cheap checks first, pixels second) and intake (a bad ref is rejected, the rest of the poll processed)."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import TopicPartition
from PIL import Image

from daemon.data.folder import ImageFolderSource
from daemon.pipeline.batcher import Batcher
from daemon.pipeline.codec import Limits, ModelSpec, Rejection, check_request, decode_inputs
from daemon.pipeline.config import ConfigError, load_config
from daemon.pipeline.intake import Intake
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.offsets import OffsetBook
from daemon.pipeline.receipts import ReceiptChain
from daemon.pipeline.runtime import ModelRuntime, RuntimeError_
from tests.pipeline_harness import request

Record = namedtuple("Record", "topic partition offset key value timestamp")
TP = TopicPartition("requests", 0)
MODEL = "digits"


class Counting:
    def __init__(self) -> None:
        self.opened: list[str] = []

    def __call__(self, path: Path):  # noqa: ANN204 - a binary file
        self.opened.append(Path(path).name)
        return open(path, "rb")  # noqa: SIM115


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for c in range(3):
        for n in range(4):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.new("L", (28, 28), 10 * c + n).save(root / f"c{c}" / f"{n}.png")
    Image.new("L", (20, 20)).save(root / "c2" / "small.png")
    (root / "c2" / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "outside.png").write_bytes((root / "c0" / "0.png").read_bytes())
    (root / "c1" / "link.png").symlink_to(tmp_path / "outside.png")
    return root


def _spec(folder: Path, opener: Counting) -> ModelSpec:
    return ModelSpec(MODEL, (1, 28, 28), 10, {"photos": ImageFolderSource.open(folder, opener=opener)})


def _body(rid: str, refs: list[str]) -> bytes:
    return json.dumps(request(rid, refs=refs, model=MODEL, labels=[1] * len(refs))).encode()


# --- the codec ----------------------------------------------------------------------------------


def test_the_first_stage_checks_paths_without_opening_a_file_the_second_reads_them(folder):
    opener = Counting()
    models = {MODEL: _spec(folder, opener)}
    checked = check_request(_body("r", ["photos:c1/2.png", "photos:5"]), None, models)
    assert opener.opened == []
    decoded = decode_inputs(checked)
    assert opener.opened == ["2.png", "1.png"]
    assert float(decoded.instances[0].x[0, 0, 0]) == pytest.approx(12 / 255)
    assert decoded.instances[0].ref == "photos:c1/2.png"


@pytest.mark.parametrize(("ref", "reason", "stage"), [
    ("photos:c1/../../outside.png", "ref_outside_source", 1),
    ("photos:/etc/x.png", "ref_outside_source", 1),
    ("photos:c1/link.png", "ref_outside_source", 1),
    ("photos:c1/missing.png", "ref_not_found", 1),
    ("photos:nope/1.png", "ref_not_found", 1),
    ("photos:1.png", "malformed_ref", 1),
    ("photos:99", "ref_out_of_range", 1),
    ("photos:c2/small.png", "wrong_shape", 2),
    ("photos:c2/broken.png", "bad_image", 2),
])
def test_every_bad_ref_is_rejected_with_its_reason(folder, ref, reason, stage):
    opener = Counting()
    models = {MODEL: _spec(folder, opener)}
    body = _body("r", ["photos:0", ref])
    if stage == 1:
        with pytest.raises(Rejection) as info:
            check_request(body, None, models)
        assert opener.opened == []
    else:
        checked = check_request(body, None, models)
        with pytest.raises(Rejection) as info:
            decode_inputs(checked)
    assert info.value.reason == reason and info.value.request_id == "r"
    assert info.value.detail.startswith("instances[1].ref")
    name = ref.rpartition("/")[2]                      # a detail never quotes the sender's path
    assert name not in info.value.detail and "outside.png" not in info.value.detail
    if stage == 2:
        assert info.value.detail.startswith("instances[1].ref: the file ")


def test_a_bad_ref_is_rejected_and_the_rest_of_the_poll_is_processed(folder, ledger_db):
    spec = _spec(folder, Counting())
    ledger, metrics = Ledger(ledger_db.target()), DaemonMetrics()
    intake = Intake(ledger, specs={MODEL: spec}, predictors={MODEL: lambda x: [5] * len(x)}, limits=Limits(),
                    batcher=Batcher(64, 1.0), offsets=OffsetBook(), receipts=ReceiptChain("d1", "receipts"),
                    dlq_topic="dlq", metrics=metrics)
    bodies = [_body("a", ["photos:c0/1.png"]), _body("b", ["photos:c1/link.png"]),
              _body("c", ["photos:c2/broken.png"]), _body("d", ["photos:c2/3.png", "photos:0"])]
    records = [Record(TP.topic, TP.partition, i, MODEL.encode(), v, 1000 + i) for i, v in enumerate(bodies)]
    assert intake.process(records) is True
    assert [p.request_id for p in intake.batcher.waiting()] == ["a", "d"]
    reasons = {json.loads(r.value)["request_id"]: json.loads(r.value).get("reason") for r in ledger.outbox()
               if r.topic == "receipts"}
    assert reasons == {"b": "ref_outside_source", "c": "bad_image"}
    assert metrics.registry.get_sample_value("unlearnd_dlq_total", {"reason": "ref_outside_source"}) == 1


# --- configuration and start-up -----------------------------------------------------------------


def _config(tmp_path: Path, models: str) -> Path:
    path = tmp_path / "u.toml"
    path.write_text(f'[registry]\ndir = "{tmp_path / "reg"}"\n{models}')
    return path


def test_sources_are_listed_in_the_config_and_dataset_stays_a_shorthand(tmp_path, folder):
    old = load_config(_config(tmp_path, '[[models]]\nname = "m"\ndataset = "mnist"\n'), env={})
    assert [s.names() for s in old.models[0].source_sections()] == [("mnist-train", "mnist-test")]
    new = load_config(_config(tmp_path, f'''[[models]]
name = "m"
probe = "photos:all"
[[models.sources]]
kind = "folder"
name = "photos"
path = "{folder}"
[[models.sources]]
kind = "array"
name = "arr"
path = "/data/a.npz"
'''), env={"UNLEARND_MODELS_0_SOURCES_1_PATH": "/data/b.npz"})
    m = new.models[0]
    assert m.dataset == "" and [s.names() for s in m.source_sections()] == [("photos",), ("arr",)]
    assert m.sources[1].path == "/data/b.npz"
    both = load_config(_config(tmp_path, f'''[[models]]
name = "m"
dataset = "mnist"
probe = "photos:0-3"
[[models.sources]]
kind = "folder"
name = "photos"
path = "{folder}"
'''), env={})
    assert [s.names() for s in both.models[0].source_sections()] == [("mnist-train", "mnist-test"), ("photos",)]


@pytest.mark.parametrize(("table", "setting", "words"), [
    ('probe = "p:all"\n[[models.sources]]\nkind = "folder"\nname = "p"\n', "models[0].sources[0].path",
     "needs a path"),
    ('probe = "p:all"\n[[models.sources]]\nkind = "array"\npath = "/x.npz"\n', "models[0].sources[0].name",
     "needs a name"),
    ('[[models.sources]]\nkind = "folder"\nname = "p"\npath = "/x"\n', "models[0].probe", "not one of"),
    ('probe = "p:all"\n[[models.sources]]\nkind = "folder"\nname = "p"\npath = "/x"\nresize = 1\n',
     "models[0].sources[0].resize", "boolean"),
    ('probe = "p:all"\n[[models.sources]]\nkind = "array"\nname = "p"\npath = "/x"\nresize = true\n',
     "models[0].sources[0].resize", "only a folder"),
    ('[[models.sources]]\nkind = "builtin"\ndataset = "mnist"\nname = "x"\n', "models[0].sources[0].name",
     "takes no name"),
    ('dataset = "mnist"\n[[models.sources]]\nkind = "builtin"\ndataset = "mnist"\n', "models[0].sources[0]",
     "already given by models[0].dataset"),
    ('probe = "p:all"\npretrain_epochs = 1\n[[models.sources]]\nkind = "folder"\nname = "p"\npath = "/x"\n',
     "models[0].pretrain_epochs", "built-in dataset"),
    ('probe = "p:all"\n[[models.sources]]\nkind = "zip"\nname = "p"\npath = "/x"\n', "models[0].sources[0].kind",
     "one of builtin, folder, array"),
    ('probe = "p:all"\n[[models.sources]]\nkind = "folder"\nname = "p"\npath = "/x"\ncolour = 1\n',
     "models[0].sources[0].colour", "unknown setting"),
])
def test_every_bad_source_entry_is_refused_naming_its_setting(tmp_path, table, setting, words):
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, f'[[models]]\nname = "m"\n{table}'), env={})
    assert info.value.setting == setting and words in str(info.value)


def _section(tmp_path: Path, sources: str, probe: str = "p:all"):
    return load_config(_config(tmp_path, f'[[models]]\nname = "m"\nprobe = "{probe}"\n{sources}'), env={}).models[0]


def _tiny_registry(tmp_path: Path, input_shape: tuple[int, int, int] = (1, 28, 28)) -> Path:
    """Version 1 of model ``m``: an untrained MNIST CNN (the sources' checks need a model, not a good one)."""
    from daemon.engine.models import build_model
    from daemon.engine.session import UnlearningSession
    from daemon.registry import model_store

    torch.manual_seed(0)
    model = build_model("mnist_cnn", num_classes=10, input_shape=input_shape, mean=[0.5], std=[0.5]).eval()
    reg = tmp_path / "reg"
    model_store.publish(reg, "m", model, UnlearningSession(model, num_classes=10), arch="mnist_cnn",
                        input_shape=input_shape, classes=[str(i) for i in range(10)], parent=None)
    return reg


def test_bad_sources_refuse_the_start_naming_the_setting(tmp_path, folder):
    from daemon.pipeline.config import RoundsSection

    (tmp_path / "empty" / "cls").mkdir(parents=True)
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((2, 1, 28, 28), np.uint8))
    np.savez(tmp_path / "rgb.npz", images=np.zeros((2, 3, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    cases = [
        (f'[[models.sources]]\nkind = "folder"\nname = "p"\npath = "{tmp_path / "nowhere"}"\n',
         "sources[0].path", "is not a folder"),
        (f'[[models.sources]]\nkind = "folder"\nname = "p"\npath = "{tmp_path / "empty"}"\n',
         "sources[0].path", "holds no images"),
        (f'[[models.sources]]\nkind = "array"\nname = "p"\npath = "{tmp_path / "nolabels.npz"}"\n',
         "sources[0].path", "no labels array"),
    ]
    for sources, setting, words in cases:
        with pytest.raises(RuntimeError_) as info:
            ModelRuntime.open(_section(tmp_path, sources), tmp_path / "reg", RoundsSection())
        assert f"models.m: {setting}: " in str(info.value) and words in str(info.value)

    reg = _tiny_registry(tmp_path)
    rt = ModelRuntime.open(_section(tmp_path, f'[[models.sources]]\nkind = "array"\nname = "p"\npath = '
                                              f'"{tmp_path / "rgb.npz"}"\n'), reg, RoundsSection())
    with pytest.raises(RuntimeError_, match=r"source 'p' \(sources\[0\].path\) cannot feed the model: its images "
                                            r"are 3×8×8, the model takes 1×28×28"):
        rt.ensure_model()
    Image.new("L", (28, 28)).save(folder / "c0" / "9.png")
    Image.new("L", (20, 20)).save(folder / "c0" / "8.png")   # the probe (c0: items 0..5) holds a 20×20 image
    rt = ModelRuntime.open(_section(tmp_path, f'[[models.sources]]\nkind = "folder"\nname = "p"\npath = '
                                              f'"{folder}"\n', "p:0-5"), reg, RoundsSection())
    with pytest.raises(RuntimeError_, match=r"models.m.probe: p:0-5 cannot be read: '?c0/8.png'? is 20×20"):
        rt.ensure_model()


def test_a_runtime_opens_a_folder_source_and_its_probe_lazily(tmp_path, folder):
    from daemon.pipeline.config import RoundsSection

    reg = _tiny_registry(tmp_path)
    section = _section(tmp_path, f'[[models.sources]]\nkind = "folder"\nname = "p"\npath = "{folder}"\n', "p:4-7")
    rt = ModelRuntime.open(section, reg, RoundsSection())
    assert rt.splits is None and rt.probe_y.tolist() == [1, 1, 1, 1]
    rt.ensure_model()
    assert rt.probe_x.shape == (4, 1, 28, 28)
    assert torch.allclose(rt.probe_x[:, 0, 0, 0], torch.tensor([10, 11, 12, 13]) / 255)
    assert set(rt.spec.sources) == {"p"} and 0 <= rt.probe_accuracy() <= 1
