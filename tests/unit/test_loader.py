"""Reading configuration: files, directories, stdin, multi-document YAML, Lists, errors."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from mesh.loader import Document, LoadError, load_documents

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: reviews
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_multi_document_indices_count_empty_documents(tmp_path: Path) -> None:
    text = "---\n" + VS.format(name="a") + "---\n---\n# only a comment\n---\n" + VS.format(name="b") + "---\n"
    path = write(tmp_path, "multi.yaml", text)
    docs = load_documents([path])
    assert [(d.index, d.body["metadata"]["name"]) for d in docs] == [(0, "a"), (3, "b")]
    assert all(d.source == path and d.item is None for d in docs)


def test_invalid_yaml_names_document_line_and_column(tmp_path: Path) -> None:
    text = VS.format(name="a") + "---\nkind: VirtualService\nmetadata:\n  name: b\n   bad: indent\n"
    path = write(tmp_path, "broken.yaml", text)
    with pytest.raises(LoadError) as info:
        load_documents([path])
    assert info.value.index == 1
    assert str(info.value).startswith(f"{path}: document 1: invalid YAML: ")
    assert "(line 15, column 7)" in str(info.value)


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "dup.yaml", "kind: VirtualService\nspec: {}\nspec: {}\n")
    with pytest.raises(LoadError, match=r"document 0: invalid YAML: duplicate key 'spec' \(line 3, column 1\)"):
        load_documents([path])


def test_scalars_read_as_kubernetes_reads_them(tmp_path: Path) -> None:
    path = write(tmp_path, "scalars.yaml", "a: [1.2.3.4, 2001:db8::]\nb: 2024-01-02\nc: {x: y}\n")
    (doc,) = load_documents([path])
    assert doc.body == {"a": ["1.2.3.4", "2001:db8::"], "b": "2024-01-02", "c": {"x": "y"}}


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(LoadError) as info:
        load_documents([missing])
    assert str(info.value) == f"{missing}: no such file or directory"
    assert info.value.index is None


def test_directory_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    write(tmp_path, "b.yaml", VS.format(name="b"))
    write(tmp_path, "a.yml", VS.format(name="a"))
    write(tmp_path, "sub/c.json", '{"kind": "VirtualService", "metadata": {"name": "c"}}')
    write(tmp_path, "notes.txt", "not config")
    docs = load_documents([str(tmp_path)])
    assert [d.body["metadata"]["name"] for d in docs] == ["a", "b", "c"]
    assert docs[2].source == str(tmp_path / "sub" / "c.json")


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="holds no .yaml, .yml or .json files"):
        load_documents([str(tmp_path)])


def test_stdin_and_files_keep_input_order(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", VS.format(name="file"))
    docs = load_documents([path, "-"], stdin=io.StringIO(VS.format(name="piped")))
    assert [(d.source, d.body["metadata"]["name"]) for d in docs] == [(path, "file"), ("<stdin>", "piped")]


def test_list_kind_expands_items(tmp_path: Path) -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n- {kind: Gateway, metadata: {name: g}}\n- {kind: VirtualService, metadata: {name: v}}\n"
    docs = load_documents(["-"], stdin=io.StringIO("---\n{}\n---\n" + text))
    assert docs[1:] == [
        Document("<stdin>", 1, {"kind": "Gateway", "metadata": {"name": "g"}}, 0),
        Document("<stdin>", 1, {"kind": "VirtualService", "metadata": {"name": "v"}}, 1),
    ]


def test_list_items_must_be_mappings() -> None:
    with pytest.raises(LoadError, match=r"<stdin>: document 0: items\[1\]: expected a mapping"):
        load_documents(["-"], stdin=io.StringIO("kind: List\nitems: [{kind: Gateway}, 3]\n"))


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "list.yaml", VS.format(name="a") + "---\n- a\n- b\n")
    with pytest.raises(LoadError) as info:
        load_documents([path])
    assert str(info.value) == f"{path}: document 1: expected a mapping (an object), got list"


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.json", '{\n  "kind": "Gateway",\n  "spec": }\n')
    with pytest.raises(LoadError, match=r"document 0: invalid JSON: Expecting value \(line 3, column 11\)"):
        load_documents([path])


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kind: \xff\n")
    with pytest.raises(LoadError, match="not UTF-8 text"):
        load_documents([str(path)])
