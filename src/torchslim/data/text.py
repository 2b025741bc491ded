"""Word-level language-modelling corpora as token-id streams, and the classic BPTT batching.

Two corpora, each three 1-D streams of token ids (train, valid, test) over one vocabulary:

* ``"kjv"``: the King James Bible as Debian's ``bible-kjv`` prints it (``bible -f "gen1:1-rev22:21"``,
  one verse a line, ``Ge1:1 In the beginning God created the heaven and the earth.``), lower-cased,
  one ``<eos>`` per verse, split by whole books (see :func:`load_corpus` for the rule and the sizes).
* ``"ptb"``: Mikolov's Penn Treebank files ``ptb.{train,valid,test}.txt`` (one sentence a line, already
  lower-cased and tokenized, rare words as ``<unk>``), with ``<eos>`` at each line end.

Ids are laid out as in PyTorch's word_language_model example: :func:`batchify` folds a stream into
``B`` columns, :func:`bptt_batches` cuts those into truncated-BPTT chunks. Usage (needs the ``bible``
program, so it is not a doctest)::

    corpus = load_corpus("kjv")                            # len(corpus.vocab) == 10_002, "<unk>" is id 0
    train = batchify(corpus.train, batch_size=20)          # (T, 20)
    for inputs, targets in bptt_batches(train, bptt=35):   # (35, 20) each, targets one step ahead
        ...
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from torchslim.errors import ConfigError, DatasetNotFound, ShapeMismatch

logger = logging.getLogger(__name__)

ENV_VAR = "TORCHSLIM_DATA"
UNK, EOS = "<unk>", "<eos>"       # ids 0 and 1 in every vocabulary load_corpus builds

# The 66 book abbreviations `bible -f` prints, in canonical order: book n (1-based) is _KJV_BOOKS[n - 1].
_KJV_BOOKS: tuple[str, ...] = (
    "Ge", "Exo", "Lev", "Num", "Deu", "Josh", "Jdgs", "Ruth", "1Sm", "2Sm", "1Ki", "2Ki", "1Chr", "2Chr",
    "Ezra", "Neh", "Est", "Job", "Psa", "Prv", "Eccl", "SSol", "Isa", "Jer", "Lam", "Eze", "Dan", "Hos",
    "Joel", "Amos", "Obad", "Jonah", "Mic", "Nahum", "Hab", "Zep", "Hag", "Zec", "Mal",
    "Mat", "Mark", "Luke", "John", "Acts", "Rom", "1Cor", "2Cor", "Gal", "Eph", "Phi", "Col", "1Th", "2Th",
    "1Tim", "2Tim", "Titus", "Phmn", "Heb", "Jas", "1Pet", "2Pet", "1Jn", "2Jn", "3Jn", "Jude", "Rev",
)
_BOOK_NUMBER = {abbr.lower(): n for n, abbr in enumerate(_KJV_BOOKS, start=1)}
_SPLIT_PERIOD, _VALID_SLOT, _TEST_SLOT = 16, 7, 11     # book n: valid if n % 16 == 7, test if n % 16 == 11
KJV_VALID_BOOKS = tuple(b for n, b in enumerate(_KJV_BOOKS, 1) if n % _SPLIT_PERIOD == _VALID_SLOT)
KJV_TEST_BOOKS = tuple(b for n, b in enumerate(_KJV_BOOKS, 1) if n % _SPLIT_PERIOD == _TEST_SLOT)

_KJV_FILE = "kjv.txt"
_KJV_RANGE = "gen1:1-rev22:21"
_KJV_HINT = (
    f"`sudo apt-get install bible-kjv` (then the `bible` program prints the text), or save the output of "
    f"`bible -f \"{_KJV_RANGE}\"` as {_KJV_FILE} in the folder you pass as data_dir= or set ${ENV_VAR} to"
)
_VERSE = re.compile(r"([1-3]?[A-Za-z]+)(\d+):(\d+)(?:\s+(.*))?")   # "1Sm3:10 And the LORD came, ..."
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")                    # letters, apostrophes inside only

_PTB_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
_PTB_HINT = (
    "put ptb.train.txt, ptb.valid.txt and ptb.test.txt (the data/ folder of Mikolov's simple-examples "
    f"archive) in one folder and pass it as data_dir=, or set ${ENV_VAR} to a folder holding them or "
    "holding a ptb/ subfolder with them"
)


@dataclass(frozen=True, eq=False, repr=False)
class Corpus:
    """A tokenized corpus: a vocabulary and three streams of ids into it.

    ``vocab[0] == "<unk>"`` and ``vocab[1] == "<eos>"``; ``len(vocab)`` is the model's output size.
    """

    vocab: list[str]      # id -> word
    train: Tensor         # (N_train,) int64 ids, verses/sentences in order, each ended by <eos>
    valid: Tensor         # (N_valid,)
    test: Tensor          # (N_test,)
    name: str             # "kjv" or "ptb"

    def __repr__(self) -> str:
        return (
            f"Corpus(name={self.name!r}, vocab={len(self.vocab)} words, train={len(self.train)}, "
            f"valid={len(self.valid)}, test={len(self.test)} tokens)"
        )


def load_corpus(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, vocab_size: int = 10_000
) -> Corpus:
    """The corpus called ``name`` (``"kjv"`` or ``"ptb"``), tokenized and split.

    Vocabulary (both corpora): ``<unk>`` (id 0), ``<eos>`` (id 1), then the ``vocab_size`` most frequent
    words of the training split, by count descending and ties alphabetically: ``vocab_size + 2`` entries,
    fewer when train has fewer distinct words. Every other word, in any split, becomes ``<unk>``.

    ``"kjv"``, the King James Bible. Text: ``data_dir/kjv.txt`` when ``data_dir`` is given (the folder
    must exist), else ``$TORCHSLIM_DATA/kjv.txt`` when that is set; when the file is not there, the
    output of ``bible -f "gen1:1-rev22:21"`` (Debian's ``bible-kjv``; run once, nothing is written).
    A ``kjv.txt`` must have that format: lines ``<Book><chapter>:<verse> <text>``, with lines that do
    not start with a reference continuing the previous verse (what ``bible -f -l60`` wraps).
    Tokens: the verse text lower-cased, runs of letters with apostrophes only between letters
    (``"shepherds' tents"`` -> ``shepherds tents``, ``"well-beloved"`` -> ``well beloved``); the
    reference and all punctuation dropped; ``<eos>`` after each verse.
    Split by whole books: book ``n`` of the 66 in canonical order (Genesis = 1, Revelation = 66) goes
    to valid when ``n % 16 == 7`` (Judges, Isaiah, Malachi, 2 Timothy), to test when ``n % 16 == 11``
    (1 Kings, Daniel, John, James), to train otherwise. On the whole text that is 699,609 / 61,503 /
    59,674 tokens (85.2 / 7.5 / 7.3 %, ``<eos>`` included; 789,684 words in 31,102 verses) and 12,064
    distinct training words; with the default ``vocab_size`` the ``<unk>`` rate is 0.3 % of train's
    tokens, 1.5 % of valid's and 1.0 % of test's.

    ``"ptb"``, the Penn Treebank of Mikolov et al. Files ``ptb.train.txt``, ``ptb.valid.txt`` and
    ``ptb.test.txt``, looked for in ``data_dir`` and ``data_dir/ptb`` when ``data_dir`` is given, else
    in ``$TORCHSLIM_DATA/ptb`` and ``$TORCHSLIM_DATA``. Tokens: each line split on whitespace, plus
    ``<eos>`` (an empty line gives a lone ``<eos>``). PTB's training words number fewer than 10,000, so
    the default ``vocab_size`` keeps all of them, as the classic setup does (10,000 entries).

    Args:
        name: ``"kjv"`` or ``"ptb"``.
        data_dir: the folder to read from instead of ``$TORCHSLIM_DATA``.
        vocab_size: how many training words get their own id, besides ``<unk>`` and ``<eos>``.
    Returns:
        the corpus, with ``train``, ``valid``, ``test`` int64 tensors of shape ``(N,)``.
    Raises:
        ConfigError: an unknown ``name`` (the message lists the valid ones) or ``vocab_size < 1``.
        DatasetNotFound: no text found (the message says where it looked and how to get it), or a file
            that is empty, not UTF-8, or (KJV) not in the format ``bible -f`` prints.
    """
    if name not in _LOADERS:
        raise ConfigError(f"unknown corpus {name!r}; valid names: {', '.join(sorted(_LOADERS))}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size must be a positive int (words besides <unk> and <eos>), got {vocab_size!r}")
    splits, source = _LOADERS[name](data_dir)
    vocab = _build_vocab(splits["train"], vocab_size)
    index = {word: i for i, word in enumerate(vocab)}
    streams = {split: _encode(tokens, index) for split, tokens in splits.items()}
    logger.info(
        "loaded %s from %s: train/valid/test %d/%d/%d tokens, vocabulary %d",
        name, source, len(streams["train"]), len(streams["valid"]), len(streams["test"]), len(vocab),
    )
    return Corpus(vocab=vocab, train=streams["train"], valid=streams["valid"], test=streams["test"], name=name)


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Fold a token stream into ``B = batch_size`` contiguous columns, dropping the ``N mod B`` last ids.

    Column ``b`` is ``ids[b*T : (b+1)*T]`` with ``T = N // B``, so each column reads on in order and
    a hidden state can be carried from one BPTT chunk to the next.

    Args:
        ids: ``(N,)`` token ids.
        batch_size: ``B``, the number of columns; at most ``N``.
    Returns:
        ``(T, B)`` tensor, contiguous, same dtype and device as ``ids``.
    Raises:
        ShapeMismatch: ``ids`` is not 1-D.
        ConfigError: ``batch_size < 1`` or ``batch_size > N``.

    Example:
        >>> batchify(torch.arange(10), 3)
        tensor([[0, 3, 6],
                [1, 4, 7],
                [2, 5, 8]])
    """
    if ids.dim() != 1:
        raise ShapeMismatch(f"batchify takes a 1-D stream of ids, got shape {tuple(ids.shape)}")
    if batch_size < 1 or batch_size > len(ids):
        raise ConfigError(f"batch_size must be between 1 and the stream's {len(ids)} tokens, got {batch_size}")
    steps = len(ids) // batch_size
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()   # (T, B)


def bptt_batches(data: Tensor, bptt: int = 35) -> Iterator[tuple[Tensor, Tensor]]:
    """Truncated-BPTT chunks of a batchified stream: ``inputs = data[i : i+t]``, ``targets = data[i+1 : i+1+t]``.

    Chunks start at ``i = 0, bptt, 2*bptt, ...`` while ``i < T - 1``; ``t = min(bptt, T - 1 - i)``, so
    the last chunk may be shorter, and there are ``ceil((T - 1) / bptt)`` chunks. Arguments are checked
    when ``bptt_batches`` is called, not on the first chunk.

    Args:
        data: ``(T, B)``, e.g. from :func:`batchify`.
        bptt: the most time steps per chunk (35 in the PTB LSTMs of Zaremba et al.).
    Returns:
        an iterator of ``(inputs (t, B), targets (t, B))``, views of ``data``.
    Raises:
        ShapeMismatch: ``data`` is not 2-D.
        ConfigError: ``bptt < 1``.

    Example:
        >>> data = batchify(torch.arange(10), 2)           # (5, 2): columns 0..4 and 5..9
        >>> [(x.tolist(), y.tolist()) for x, y in bptt_batches(data, bptt=3)][1]
        ([[3, 8]], [[4, 9]])
    """
    if data.dim() != 2:
        raise ShapeMismatch(f"bptt_batches takes (T, B) data from batchify, got shape {tuple(data.shape)}")
    if bptt < 1:
        raise ConfigError(f"bptt must be >= 1 time step, got {bptt}")
    return _chunks(data, bptt)


def _chunks(data: Tensor, bptt: int) -> Iterator[tuple[Tensor, Tensor]]:
    last = len(data) - 1                            # the final row is only ever a target
    for start in range(0, last, bptt):
        steps = min(bptt, last - start)
        yield data[start:start + steps], data[start + 1:start + 1 + steps]     # (t, B), (t, B)


def _build_vocab(train: list[str], vocab_size: int) -> list[str]:
    counts = Counter(train)
    counts.pop(UNK, None)
    counts.pop(EOS, None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))    # count desc, then a-z
    return [UNK, EOS] + [word for word, _ in ranked[:vocab_size]]


def _encode(tokens: list[str], index: dict[str, int]) -> Tensor:
    unk = index[UNK]
    return torch.tensor([index.get(token, unk) for token in tokens], dtype=torch.int64)


# --- King James Bible ------------------------------------------------------------------------------


def _load_kjv(data_dir: str | os.PathLike[str] | None) -> tuple[dict[str, list[str]], str]:
    text, source = _kjv_text(data_dir)
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for book, verse in _kjv_verses(text, source):
        tokens = splits[_kjv_split(book)]
        tokens.extend(_WORD.findall(verse.lower()))
        tokens.append(EOS)
    return splits, source


def _kjv_split(book: int) -> str:
    if book % _SPLIT_PERIOD == _VALID_SLOT:
        return "valid"
    if book % _SPLIT_PERIOD == _TEST_SLOT:
        return "test"
    return "train"


def _kjv_text(data_dir: str | os.PathLike[str] | None) -> tuple[str, str]:
    """The Bible's text and where it came from: a kjv.txt if one is there, else the `bible` program."""
    looked = []
    for root, why in _roots(data_dir):
        path = root / _KJV_FILE
        if path.is_file():
            return _read_text(path), str(path)
        looked.append(f"{path} ({why})")
    if data_dir is None and not os.environ.get(ENV_VAR):
        looked.append(f"${ENV_VAR}/{_KJV_FILE} (${ENV_VAR} not set)")
    program = shutil.which("bible")
    if program is None:
        looked.append("the `bible` program on PATH (not found)")
        raise DatasetNotFound(
            "kjv: found no King James Bible text. Looked for:\n  " + "\n  ".join(looked) + f"\nTo get it: {_KJV_HINT}"
        )
    return _run_bible(program), f"`bible -f {_KJV_RANGE}`"


def _run_bible(program: str) -> str:
    command = [program, "-f", _KJV_RANGE]
    try:
        done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatasetNotFound(f"kjv: running {' '.join(command)} failed ({exc}); reinstall bible-kjv") from exc
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip()[-500:]
        raise DatasetNotFound(
            f"kjv: {' '.join(command)} exited with status {done.returncode}: {detail or '(no message)'}; "
            "reinstall bible-kjv (`sudo apt-get install --reinstall bible-kjv bible-kjv-text`)"
        )
    return _decode(done.stdout, f"the output of {' '.join(command)}")


def _kjv_verses(text: str, source: str) -> list[tuple[int, str]]:
    """``(book number, verse text)`` per verse, wrapped lines joined back onto their verse."""
    verses: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        match = _VERSE.fullmatch(line)
        if match is None:
            if not verses:
                raise _not_kjv(source, lineno, line, "text before the first verse reference")
            book, body = verses[-1]
            verses[-1] = (book, f"{body} {line}")
            continue
        book = _BOOK_NUMBER.get(match[1].lower())
        if book is None:
            raise _not_kjv(source, lineno, line, f"unknown book abbreviation {match[1]!r}")
        verses.append((book, match[4] or ""))
    if not verses:
        raise DatasetNotFound(f"kjv: {source} holds no verses (it is empty); expected {_expected_kjv()}")
    return verses


def _not_kjv(source: str, lineno: int, line: str, what: str) -> DatasetNotFound:
    return DatasetNotFound(
        f"kjv: {source} is not in bible-kjv's format: line {lineno} ({line[:60]!r}) has {what}; "
        f"expected {_expected_kjv()}"
    )


def _expected_kjv() -> str:
    return (
        f"lines like 'Ge1:1 In the beginning God created the heaven and the earth.', as written by "
        f"`bible -f \"{_KJV_RANGE}\" > {_KJV_FILE}` (book abbreviations: {' '.join(_KJV_BOOKS[:4])} ... "
        f"{_KJV_BOOKS[-1]})"
    )


# --- Penn Treebank ---------------------------------------------------------------------------------


def _load_ptb(data_dir: str | os.PathLike[str] | None) -> tuple[dict[str, list[str]], str]:
    folder = _ptb_folder(data_dir)
    splits = {split: _ptb_tokens(folder / filename) for split, filename in _PTB_FILES.items()}
    return splits, str(folder)


def _ptb_folder(data_dir: str | os.PathLike[str] | None) -> Path:
    looked = []
    for root, why in _roots(data_dir):
        folders = [root, root / "ptb"] if data_dir is not None else [root / "ptb", root]
        for folder in folders:
            missing = [name for name in _PTB_FILES.values() if not (folder / name).is_file()]
            if not missing:
                return folder
            absent = "folder does not exist" if not folder.is_dir() else f"missing {', '.join(missing)}"
            looked.append(f"{folder} ({why}: {absent})")
    if data_dir is None and not os.environ.get(ENV_VAR):
        looked.append(f"${ENV_VAR} (not set)")
    raise DatasetNotFound(
        "ptb: found no folder with ptb.train.txt, ptb.valid.txt and ptb.test.txt. Looked in:\n  "
        + "\n  ".join(looked) + f"\nTo get it: {_PTB_HINT}."
    )


def _ptb_tokens(path: Path) -> list[str]:
    lines = _read_text(path).split("\n")
    if lines[-1] == "":
        lines.pop()                                 # the newline that ends the last line
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    if len(tokens) == len(lines):
        raise DatasetNotFound(
            f"ptb: {path} holds no words (it is empty or blank); replace it with the Penn Treebank's "
            "file: one tokenized sentence a line"
        )
    return tokens


# --- shared ----------------------------------------------------------------------------------------


def _roots(data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """The folders to read from, each with how it was chosen: data_dir alone when given, else $TORCHSLIM_DATA."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DatasetNotFound(
                f"data_dir {root} does not exist or is not a folder; pass the folder that holds the "
                f"corpus files ({_KJV_FILE}, or ptb.train.txt, ptb.valid.txt and ptb.test.txt)"
            )
        return [(root, "data_dir argument")]
    if os.environ.get(ENV_VAR):
        return [(Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}")]
    return []


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetNotFound(f"cannot read {path}: {exc}; check that it exists and its permissions") from exc
    return _decode(raw, str(path))


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetNotFound(f"{source} is not UTF-8 text ({exc}); is it the right file?") from exc


_LOADERS = {"kjv": _load_kjv, "ptb": _load_ptb}
CORPORA: tuple[str, ...] = tuple(_LOADERS)  # the names load_corpus takes
