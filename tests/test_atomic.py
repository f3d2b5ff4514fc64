"""fusetune.atomic: a save replaces an earlier save whole, and never deletes what it did not write."""
import pytest

from fusetune.atomic import MANIFEST, atomic_directory


def _write(directory, **files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (directory / name.replace("__", "/")).write_text(text)


def test_an_earlier_save_is_replaced_whole(tmp_path):
    target = tmp_path / "model"
    _write(target, **{"config.json": "{}", "model-00001-of-00002.safetensors": "old", "tokenizer.json": "{}"})
    with atomic_directory(target) as tmp:
        _write(tmp, **{"config.json": "{}", "model.safetensors": "new"})
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left aside


def test_a_save_replaces_what_it_wrote_whatever_the_names(tmp_path):
    target = tmp_path / "model"
    for text in ("first", "second"):  # files no allow-list knows (remote code, a template folder) are its own
        with atomic_directory(target) as tmp:
            _write(tmp, **{"config.json": text, "modeling_custom.py": text, "additional_chat_templates__x.jinja": text})
    assert (target / "modeling_custom.py").read_text() == "second"
    (target / "NOTES.md").write_text("mine")
    with pytest.raises(FileExistsError, match="NOTES.md, which a save did not write"):
        with atomic_directory(target) as tmp:
            _write(tmp, **{"config.json": "third"})
    assert (target / "NOTES.md").read_text() == "mine" and (target / "config.json").read_text() == "second"


@pytest.mark.parametrize("extra", [{"NOTES.md": "mine"}, {"eval__results.json": "{}"}])
def test_a_save_never_deletes_what_it_did_not_write(tmp_path, extra):
    target = tmp_path / "model"
    _write(target, **{"config.json": "{}", "model.safetensors": "fp32 weights"}, **extra)
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    with pytest.raises(FileExistsError, match="which a save did not write; saving there would delete them"):
        with atomic_directory(target) as tmp:
            _write(tmp, **{"config.json": "{}"})
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_folder_without_a_save_or_a_file_is_refused(tmp_path):
    _write(tmp_path / "notes", **{"a.txt": "keep"})
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "notes", tmp_path / "file"):
        with pytest.raises(FileExistsError, match="holds no earlier model save"):
            with atomic_directory(target):
                pass


def test_a_failed_rename_puts_the_earlier_save_back(tmp_path, monkeypatch):
    from pathlib import Path

    from fusetune.atomic import SaveError

    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        _write(tmp, **{"config.json": "first"})
    real = Path.rename

    def failing(self, to):
        if self.name.startswith(".model.tmp-"):
            raise OSError(5, "Input/output error")
        return real(self, to)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(SaveError, match="could not write .*model: Input/output error; .* nothing at .* was replaced"):
        with atomic_directory(target) as tmp:
            _write(tmp, **{"config.json": "second"})
    assert (target / "config.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_save_cleans_what_a_crash_left_of_its_target_and_nothing_else(tmp_path):
    target = tmp_path / "model"
    _write(tmp_path / ".model.tmp-abcd1234", **{"config.json": "half"})
    _write(tmp_path / ".model.old-1f2e", **{"config.json": "earlier"})  # moved aside; the new one never landed
    _write(tmp_path, **{".other.tmp-abcd1234": "not ours", ".model.tmp-notes": "the user's"})
    with atomic_directory(target) as tmp:
        _write(tmp, **{"config.json": "new"})
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-notes", ".other.tmp-abcd1234", "model"]
