"""Word-level corpora: the real KJV through Debian's `bible`, PTB-format files written here, BPTT batching."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from torchslim.data import Corpus, batchify, bptt_batches, load_corpus
from torchslim.data.text import KJV_TEST_BOOKS, KJV_VALID_BOOKS
from torchslim.errors import ConfigError, DatasetNotFound, ShapeMismatch

BIBLE = shutil.which("bible")
needs_bible = pytest.mark.skipif(
    BIBLE is None, reason="the `bible` program is missing (`sudo apt-get install bible-kjv` runs these tests)"
)
UNK, EOS = 0, 1
BOOKS = [                                               # as `bible -f` abbreviates them, canonical order
    "Ge", "Exo", "Lev", "Num", "Deu", "Josh", "Jdgs", "Ruth", "1Sm", "2Sm", "1Ki", "2Ki", "1Chr", "2Chr",
    "Ezra", "Neh", "Est", "Job", "Psa", "Prv", "Eccl", "SSol", "Isa", "Jer", "Lam", "Eze", "Dan", "Hos",
    "Joel", "Amos", "Obad", "Jonah", "Mic", "Nahum", "Hab", "Zep", "Hag", "Zec", "Mal",
    "Mat", "Mark", "Luke", "John", "Acts", "Rom", "1Cor", "2Cor", "Gal", "Eph", "Phi", "Col", "1Th", "2Th",
    "1Tim", "2Tim", "Titus", "Phmn", "Heb", "Jas", "1Pet", "2Pet", "1Jn", "2Jn", "3Jn", "Jude", "Rev",
]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHSLIM_DATA", raising=False)


def _bible(*args: str) -> str:
    return subprocess.run([BIBLE, *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def bible_text() -> str:
    if BIBLE is None:
        pytest.skip("the `bible` program is missing (`sudo apt-get install bible-kjv` runs these tests)")
    return _bible("-f", "gen1:1-rev22:21")


@pytest.fixture(scope="module")
def kjv(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    if BIBLE is None:
        pytest.skip("the `bible` program is missing (`sudo apt-get install bible-kjv` runs these tests)")
    return load_corpus("kjv", tmp_path_factory.mktemp("no_kjv_txt"))    # no kjv.txt there: runs `bible`


def _words(corpus: Corpus, ids: torch.Tensor) -> list[str]:
    return [corpus.vocab[i] for i in ids.tolist()]


def _write(folder: Path, name: str, text: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# --- the real King James Bible ---------------------------------------------------------------------


@needs_bible
def test_kjv_sizes_vocab_and_unk_rate(kjv: Corpus, bible_text: str) -> None:
    streams = (kjv.train, kjv.valid, kjv.test)
    total = sum(len(s) for s in streams)
    verses = sum(int((s == EOS).sum()) for s in streams)
    assert all(s.dtype == torch.int64 and s.dim() == 1 for s in streams)
    assert verses == len(bible_text.splitlines()) == 31_102                # one <eos> per verse
    assert 790_000 <= total <= 830_000 and 780_000 <= total - verses <= 800_000   # tokens; words
    assert [len(s) for s in streams] == [699_609, 61_503, 59_674]          # as load_corpus's docstring says
    assert 0.83 < len(kjv.train) / total < 0.87
    assert 0.065 < len(kjv.valid) / total < 0.085 and 0.065 < len(kjv.test) / total < 0.085
    assert len(kjv.vocab) == 10_002 and kjv.vocab[:4] == ["<unk>", "<eos>", "the", "and"]
    assert len(set(kjv.vocab)) == len(kjv.vocab)
    unk_rate = [float((s == UNK).float().mean()) for s in streams]
    assert 0.001 < unk_rate[0] < 0.005 and all(0.005 < r < 0.02 for r in unk_rate[1:])
    assert repr(kjv) == "Corpus(name='kjv', vocab=10002 words, train=699609, valid=61503, test=59674 tokens)"


@needs_bible
def test_kjv_splits_by_whole_books(kjv: Corpus, bible_text: str) -> None:
    assert KJV_VALID_BOOKS == ("Jdgs", "Isa", "Mal", "2Tim") and KJV_TEST_BOOKS == ("1Ki", "Dan", "John", "Jas")
    refs = [line.split(" ", 1)[0] for line in bible_text.splitlines()]
    book_of = [ref.rstrip("0123456789:") for ref in refs]                 # "1Ki22:53" -> "1Ki"
    assert list(dict.fromkeys(book_of)) == BOOKS
    verses_in = {
        "valid": sum(b in KJV_VALID_BOOKS for b in book_of),
        "test": sum(b in KJV_TEST_BOOKS for b in book_of),
    }
    assert int((kjv.valid == EOS).sum()) == verses_in["valid"]
    assert int((kjv.test == EOS).sum()) == verses_in["test"]
    first_of_1kings = ["now", "king", "david", "was", "old", "and", "stricken", "in", "years", "and", "they"]
    assert _words(kjv, kjv.test[: len(first_of_1kings)]) == first_of_1kings
    assert _words(kjv, kjv.train[:5]) == ["in", "the", "beginning", "god", "created"]


def test_kjv_every_verse_of_a_held_out_book_leaves_train(tmp_path: Path) -> None:
    """One verse per book, each a word of its own: train's words are exactly the 58 training books'."""
    marker = {book: "w" + "".join("abcdefghij"[int(d)] for d in f"{n:02d}") for n, book in enumerate(BOOKS)}
    _write(tmp_path, "kjv.txt", "".join(f"{book}1:1 {marker[book]}.\n" for book in BOOKS))
    corpus = load_corpus("kjv", tmp_path)
    held_out = set(KJV_VALID_BOOKS) | set(KJV_TEST_BOOKS)
    expected_train = [w for book in BOOKS if book not in held_out for w in (marker[book], "<eos>")]
    assert _words(corpus, corpus.train) == expected_train
    assert len(corpus.vocab) == 2 + 58
    assert corpus.valid.tolist() == [UNK, EOS] * 4 and corpus.test.tolist() == [UNK, EOS] * 4  # unseen in train


@needs_bible
def test_kjv_is_deterministic(kjv: Corpus, tmp_path: Path) -> None:
    again = load_corpus("kjv", tmp_path)
    assert again.vocab == kjv.vocab
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(again, split), getattr(kjv, split))


@needs_bible
def test_kjv_txt_wrapped_or_not_reads_as_the_program(tmp_path: Path) -> None:
    books = "ru1:1-ru4:22"                                                 # Ruth, a training book
    plain, wrapped = _bible("-f", books), _bible("-f", "-l50", books)
    assert len(wrapped.splitlines()) > len(plain.splitlines())              # -l50 did wrap verses
    a = load_corpus("kjv", _write(tmp_path / "plain", "kjv.txt", plain).parent)
    b = load_corpus("kjv", _write(tmp_path / "wrapped", "kjv.txt", wrapped.replace("\n", "\r\n")).parent)
    assert a.vocab == b.vocab and torch.equal(a.train, b.train)
    assert int((a.train == EOS).sum()) == len(plain.splitlines()) == 85


def test_kjv_tokens_hand_computed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "kjv.txt",
           "Ge1:1 The LORD's shepherds' well-beloved; (Selah.) Amen!\nGe1:2 b a b c\nGe1:3 a c b\n")
    monkeypatch.setenv("TORCHSLIM_DATA", str(tmp_path))                  # found through the variable
    corpus = load_corpus("kjv")
    assert _words(corpus, corpus.train[:7]) == ["the", "lord's", "shepherds", "well", "beloved", "selah", "amen"]
    # counts: b 3, a 2, c 2 (tie: alphabetical), then the six words seen once, alphabetically
    assert corpus.vocab[:5] == ["<unk>", "<eos>", "b", "a", "c"]
    small = load_corpus("kjv", vocab_size=2)
    assert small.vocab == ["<unk>", "<eos>", "b", "a"]
    assert _words(small, small.train[-4:]) == ["a", "<unk>", "b", "<eos>"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no verses"),
        ("\n\n", "holds no verses"),
        ("The Project Gutenberg eBook of The King James Bible\nGe1:1 In the beginning\n", "line 1"),
        ("Ge1:1 In the beginning\nGenesis2:1 Thus the heavens\n", "unknown book abbreviation 'Genesis'"),
    ],
)
def test_kjv_malformed_text_is_rejected(tmp_path: Path, text: str, message: str) -> None:
    _write(tmp_path, "kjv.txt", text)
    with pytest.raises(DatasetNotFound, match=message) as info:
        load_corpus("kjv", tmp_path)
    assert "bible -f" in str(info.value)                                   # says what format to produce


def test_kjv_missing_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))                              # no `bible` program
    with pytest.raises(DatasetNotFound) as info:
        load_corpus("kjv", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "kjv.txt") in message and "`bible` program on PATH (not found)" in message
    assert "apt-get install bible-kjv" in message
    with pytest.raises(DatasetNotFound, match=r"\$TORCHSLIM_DATA/kjv.txt \(\$TORCHSLIM_DATA not set\)"):
        load_corpus("kjv")


@pytest.mark.parametrize("name", ["kjv", "ptb"])
def test_missing_data_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetNotFound, match=f"data_dir {tmp_path / 'nope'} does not exist"):
        load_corpus(name, tmp_path / "nope")


# --- Penn Treebank format --------------------------------------------------------------------------


def _write_ptb(folder: Path, train: str = " the cat sat \n the dog <unk> \n", valid: str = " the bird\n",
               test: str = " dog sat N\n\n") -> Path:
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        _write(folder, f"ptb.{split}.txt", text)
    return folder


def test_ptb_reads_lines_with_eos_and_maps_unknown_words(tmp_path: Path) -> None:
    corpus = load_corpus("ptb", _write_ptb(tmp_path))
    assert corpus.name == "ptb"
    assert corpus.vocab == ["<unk>", "<eos>", "the", "cat", "dog", "sat"]   # the: 2, then a-z
    assert corpus.train.tolist() == [2, 3, 5, EOS, 2, 4, UNK, EOS]
    assert corpus.valid.tolist() == [2, UNK, EOS]                           # "bird" is not in train
    assert corpus.test.tolist() == [4, 5, UNK, EOS, EOS]                    # "N" unknown; empty line: <eos>
    assert corpus.train.dtype == torch.int64


def test_ptb_found_in_a_ptb_subfolder_of_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_ptb(tmp_path / "ptb")
    monkeypatch.setenv("TORCHSLIM_DATA", str(tmp_path))
    assert load_corpus("ptb").vocab[2] == "the"
    assert load_corpus("ptb", tmp_path).vocab[2] == "the"                   # data_dir/ptb too


def test_ptb_missing_files(tmp_path: Path) -> None:
    _write(tmp_path, "ptb.train.txt", " a b\n")
    with pytest.raises(DatasetNotFound) as info:
        load_corpus("ptb", tmp_path)
    message = str(info.value)
    assert f"{tmp_path} (data_dir argument: missing ptb.valid.txt, ptb.test.txt)" in message
    assert "folder does not exist" in message and "simple-examples" in message
    with pytest.raises(DatasetNotFound, match=r"\$TORCHSLIM_DATA \(not set\)"):
        load_corpus("ptb")


@pytest.mark.parametrize(("content", "message"), [(b"", "holds no words"), (b" \n\n", "holds no words"),
                                                  (b"\xff\xfe caf\xe9\n", "not UTF-8")])
def test_ptb_empty_or_binary_file(tmp_path: Path, content: bytes, message: str) -> None:
    _write_ptb(tmp_path)
    _write(tmp_path, "ptb.valid.txt", content)
    with pytest.raises(DatasetNotFound, match=message):
        load_corpus("ptb", tmp_path)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="valid names: kjv, ptb"):
        load_corpus("wikitext", tmp_path)
    with pytest.raises(ConfigError, match="vocab_size"):
        load_corpus("ptb", _write_ptb(tmp_path), vocab_size=0)


# --- batching --------------------------------------------------------------------------------------


def test_batchify_folds_contiguous_columns() -> None:
    ids = torch.arange(103)
    data = batchify(ids, 10)
    assert data.shape == (10, 10) and data.is_contiguous()
    for b in range(10):
        assert torch.equal(data[:, b], ids[b * 10:(b + 1) * 10])           # the last 3 ids dropped


@pytest.mark.parametrize(
    ("steps", "bptt", "lengths"), [(10, 4, [4, 4, 1]), (9, 4, [4, 4]), (2, 35, [1]), (1, 3, [])]
)
def test_bptt_targets_are_inputs_shifted_by_one(steps: int, bptt: int, lengths: list[int]) -> None:
    data = torch.arange(steps * 3).view(steps, 3)                          # (T, B)
    chunks = list(bptt_batches(data, bptt))
    assert [len(x) for x, _ in chunks] == lengths
    for inputs, targets in chunks:
        assert inputs.shape == targets.shape and inputs.shape[1] == 3
        assert torch.equal(targets[:-1], inputs[1:])
    if chunks:
        assert torch.equal(torch.cat([x for x, _ in chunks]), data[:-1])
        assert torch.equal(torch.cat([y for _, y in chunks]), data[1:])


@needs_bible
def test_kjv_batches(kjv: Corpus) -> None:
    data = batchify(kjv.train, 20)                                          # (T, B) = (34980, 20)
    assert data.shape == (len(kjv.train) // 20, 20)
    chunks = list(bptt_batches(data))
    assert len(chunks) == math.ceil((len(data) - 1) / 35)
    assert all(x.shape == (35, 20) for x, _ in chunks[:-1]) and 1 <= len(chunks[-1][0]) <= 35


def test_batching_rejects_bad_shapes_and_sizes() -> None:
    with pytest.raises(ShapeMismatch, match="1-D"):
        batchify(torch.zeros(4, 2, dtype=torch.long), 2)
    with pytest.raises(ConfigError, match="batch_size"):
        batchify(torch.arange(5), 0)
    with pytest.raises(ConfigError, match="5 tokens"):
        batchify(torch.arange(5), 6)
    with pytest.raises(ShapeMismatch, match=r"\(T, B\)"):
        bptt_batches(torch.arange(5), 2)
    with pytest.raises(ConfigError, match="bptt"):
        bptt_batches(torch.zeros(4, 2), 0)
