"""A Llama-3 model and context in libllama: tokens and embedding rows in, logits and samples out."""

from __future__ import annotations

import ctypes
import functools
import re
import warnings
from pathlib import Path

import numpy as np

from llama3v import gguf_schema as S
from llama3v.errors import Llama3vError
from llama3v.runtime import engine
from llama3v.runtime.gguf_check import GGUFInfo, check_llm, read_model

_KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type ids for the KV cache
_FLASH_ATTN = {None: -1, False: 0, True: 1}
_ATTR_UNKNOWN, _ATTR_CONTROL = 1 << 0, 1 << 3  # llama_token_attr


class TextModel:
    """A llama-architecture GGUF loaded in libllama, with its vocabulary."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0, info: GGUFInfo | None = None,
                 borrow: object = None):
        self.path = Path(path)
        self.info = info or read_model(self.path)
        self.n_embd = check_llm(self.info)
        self._llama, _ = engine.libs()
        self._owned = borrow is None  # a borrowed llama_model (llama_cpp.Llama's) is freed by its owner
        if borrow is not None:
            self.ptr = borrow
        else:
            params = self._llama.llama_model_default_params()
            params.n_gpu_layers = n_gpu_layers
            engine.take_log()
            self.ptr = self._llama.llama_model_load_from_file(str(self.path).encode(), params)
            if not self.ptr:
                raise engine.failure(f"{self.path}: llama.cpp could not load this model")
        self.vocab = self._llama.llama_model_get_vocab(self.ptr)
        self.n_vocab = self._llama.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = self._llama.llama_model_n_ctx_train(self.ptr)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`, no BOS added (the chat template writes it). `special`: the text of a control
        token (`<|eot_id|>`) becomes that token; only for text the chat template wrote, never for a user's."""
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (self._llama.llama_token * cap)()
        n = self._llama.llama_tokenize(self.vocab, raw, len(raw), buf, cap, False, special)
        if n < 0:
            raise Llama3vError(f"tokenization of {len(raw)} bytes failed")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token as generated text (special tokens rendered empty)."""
        buf = ctypes.create_string_buffer(64)
        n = self._llama.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        """The vocabulary entry of a token (for special tokens such as BOS)."""
        return self._llama.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        """True for end-of-turn / end-of-text tokens."""
        return bool(self._llama.llama_vocab_is_eog(self.vocab, token))

    @property
    def bos_text(self) -> str:
        """The BOS token's text."""
        return self.token_text(self._llama.llama_vocab_bos(self.vocab))

    def tokenize_prompt(self, text: str) -> list[int]:
        """Token ids of rendered prompt text: control tokens parsed where the template wrote them, never inside
        the user's text (a `prompt.Text`'s `plain` ranges).

        The text is cut at the template's control tokens, as llama.cpp cuts it when parsing specials, and each
        piece tokenized plain, so ids equal llama.cpp's own wherever the user typed no control token.
        """
        plain = getattr(text, "plain", ())
        if not plain:
            return self.tokenize(text)
        out, pos = [], 0
        for match in self._controls.finditer(text):
            if any(a < match.end() and match.start() < b for a, b in plain):
                continue
            if match.start() > pos:
                out += self.tokenize(text[pos:match.start()], special=False)
            out += self.tokenize(match.group(0))
            pos = match.end()
        return out + (self.tokenize(text[pos:], special=False) if pos < len(text) else [])

    @functools.cached_property
    def _controls(self) -> re.Pattern:
        # Longest first, as llama.cpp matches them; a pattern that matches nothing when there are none.
        return re.compile("|".join(re.escape(t) for t in self.control_texts()) or r"(?!)")

    def control_texts(self) -> list[str]:
        """The texts that tokenize as control tokens only when special tokens are parsed (llama.cpp's
        CONTROL and UNKNOWN attributes), longest first."""
        if not hasattr(self, "_control_texts"):
            flags = _ATTR_CONTROL | _ATTR_UNKNOWN
            found = {self.token_text(t) for t in range(self.n_vocab)
                     if self._llama.llama_vocab_get_attr(self.vocab, t) & flags}
            self._control_texts = sorted((t for t in found if t), key=len, reverse=True)
        return self._control_texts

    @property
    def eos_text(self) -> str:
        """The EOS token's text."""
        return self.token_text(self._llama.llama_vocab_eos(self.vocab))

    @property
    def chat_format(self) -> str | None:
        """Which format the GGUF's chat template is (`llama3v.chat.format`), when the converter said."""
        value = self.info.get(S.CHAT_FORMAT)
        return value if isinstance(value, str) else None

    @property
    def chat_template(self) -> str | None:
        """The chat template stored in the GGUF, if any."""
        raw = self._llama.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8") if raw else None

    def close(self) -> None:
        """Free the model (unless borrowed)."""
        if getattr(self, "ptr", None):
            if self._owned:
                self._llama.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()


class Context:
    """A libllama context of one or more sequences (ids 0..n_seq-1), each with its own KV region of `n_ctx`
    positions: decodes tokens and embedding rows at a sequence's next positions, or one token of several
    sequences in one batch (continuous batching)."""

    def __init__(self, model: TextModel, n_ctx: int, n_batch: int = 512, n_threads: int | None = None,
                 kv_type: str = "f16", flash_attn: bool | None = None, borrow: object = None, n_seq: int = 1):
        """A context of `n_ctx` positions per sequence (runtime/options.py holds the default), or `borrow` an
        existing one (one sequence)."""
        self.model = model
        llama = self._llama = model._llama
        self._owned = borrow is None
        if not 1 <= n_seq <= n_batch:
            raise Llama3vError(f"{n_seq} sequences do not fit one batch of {n_batch}: choose 1 to {n_batch}")
        if borrow is not None:
            if n_seq != 1:
                raise Llama3vError("a borrowed context serves one sequence")
            self.ptr = borrow
        else:
            params = llama.llama_context_default_params()
            threads = n_threads or engine.default_threads()
            # Not unified: libllama splits the KV cache into one stream of n_ctx cells per sequence, so each
            # sequence keeps its own region and its attention sees only its own cells.
            params.n_ctx = n_ctx * n_seq
            params.n_seq_max = n_seq
            params.kv_unified = False
            params.n_batch = params.n_ubatch = n_batch
            params.n_threads = params.n_threads_batch = threads
            params.type_k = params.type_v = _KV_TYPES[kv_type]
            params.flash_attn_type = _FLASH_ATTN[flash_attn]
            params.no_perf = True
            engine.take_log()
            self.ptr = llama.llama_init_from_model(model.ptr, params)
            if not self.ptr:
                raise engine.failure(f"{model.path}: llama.cpp could not create a context of {n_ctx} tokens"
                                     + (f" for each of {n_seq} sequences" if n_seq > 1 else ""))
        self.n_ctx = llama.llama_n_ctx_seq(self.ptr)  # positions per sequence
        if self.n_ctx > model.n_ctx_train > 0:
            # llama.cpp runs it, but positions past the trained length are outside what the model learned.
            warnings.warn(f"{model.path.name}: a context of {self.n_ctx} positions goes past the {model.n_ctx_train} "
                          "the model was trained on; answers may degrade beyond that", stacklevel=3)
        self.n_batch = n_batch
        self.n_seq = n_seq
        self.n_past = [0] * n_seq  # positions decoded, per sequence
        self._out = [-1] * n_seq  # index in the last batch of each sequence's last logits
        self._tok = llama.llama_batch_init(n_batch, 0, 1)
        self._emb = llama.llama_batch_init(n_batch, model.n_embd, 1)
        for batch in (self._tok, self._emb):
            for i in range(n_batch):
                batch.n_seq_id[i] = 1

    def fits(self, n_positions: int) -> bool:
        """The one rule for the context's size: `n_positions` positions of a sequence fit unless they exceed it."""
        return n_positions <= self.n_ctx

    def truncate(self, n: int, seq: int = 0) -> None:
        """Forget every position of sequence `seq` from `n` on (keeps the KV cache of its first n)."""
        if n < self.n_past[seq]:
            self._llama.llama_memory_seq_rm(self._llama.llama_get_memory(self.ptr), seq, n, -1)
        self.n_past[seq] = min(n, self.n_past[seq])

    def decode_tokens(self, tokens: list[int], all_logits: bool = False, seq: int = 0) -> np.ndarray | None:
        """Decode tokens into sequence `seq`; return logits of the last one, or of each one with `all_logits`."""
        return self._decode(np.asarray(tokens, dtype=np.int32), None, all_logits, seq)

    def decode_embeddings(self, rows: np.ndarray, all_logits: bool = False, seq: int = 0) -> np.ndarray | None:
        """Decode embedding rows [n, n_embd] in place of tokens; logits as in decode_tokens."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.model.n_embd:
            raise Llama3vError(f"embedding rows must be [n, {self.model.n_embd}], got {list(rows.shape)}")
        return self._decode(None, rows, all_logits, seq)

    def decode_step(self, tokens: dict[int, int]) -> None:
        """Decode one token for each sequence in `tokens` ({seq: token}) in a single batch, keeping each one's
        logits for `logits(seq)` and sampling."""
        if not tokens:
            return
        for seq in tokens:
            if not self.fits(self.n_past[seq] + 1):
                raise Llama3vError(f"the context holds {self.n_ctx} tokens per sequence; sequence {seq} is full")
        batch, m = self._tok, len(tokens)
        batch.n_tokens = m
        for i, (seq, tok) in enumerate(tokens.items()):
            batch.token[i], batch.pos[i], batch.seq_id[i][0], batch.logits[i] = tok, self.n_past[seq], seq, 1
        self._run(batch, f"a step of {m} sequences")
        for i, seq in enumerate(tokens):
            self.n_past[seq] += 1
            self._out[seq] = i

    def _decode(self, tokens: np.ndarray | None, rows: np.ndarray | None, all_logits: bool,
                seq: int) -> np.ndarray | None:
        n = len(tokens) if tokens is not None else len(rows)
        if n == 0:
            return None
        if not self.fits(self.n_past[seq] + n):
            raise Llama3vError(f"the context holds {self.n_ctx} tokens; {self.n_past[seq] + n} are needed")
        batch = self._tok if tokens is not None else self._emb
        outputs = []
        for start in range(0, n, self.n_batch):
            m = min(self.n_batch, n - start)
            batch.n_tokens = m
            if tokens is not None:
                np.ctypeslib.as_array(batch.token, shape=(m,))[:] = tokens[start:start + m]
            else:
                d = self.model.n_embd
                np.ctypeslib.as_array(batch.embd, shape=(m * d,))[:] = rows[start:start + m].reshape(-1)
            np.ctypeslib.as_array(batch.pos, shape=(m,))[:] = np.arange(self.n_past[seq], self.n_past[seq] + m)
            for i in range(m):
                batch.seq_id[i][0] = seq
            flags = np.ctypeslib.as_array(batch.logits, shape=(m,))
            flags[:] = 1 if all_logits else 0
            if not all_logits and start + m == n:
                flags[m - 1] = 1
            self._run(batch, f"position {self.n_past[seq]}")
            self.n_past[seq] += m
            self._out[seq] = m - 1
            for i in np.flatnonzero(flags):
                outputs.append(self._logits(int(i)))
        return np.stack(outputs) if all_logits else outputs[-1]

    def _run(self, batch: object, where: str) -> None:
        engine.take_log()
        rc = self._llama.llama_decode(self.ptr, batch)
        if rc != 0:
            raise engine.failure(f"llama_decode failed (code {rc}) at {where}")

    def logits(self, seq: int = 0) -> np.ndarray:
        """Logits of sequence `seq`'s last decoded position (the one its next token is sampled from)."""
        return self._logits(self._out[seq])

    def output_index(self, seq: int = 0) -> int:
        """Where in the last batch sequence `seq`'s logits are (valid until the next decode)."""
        return self._out[seq]

    def _logits(self, i: int) -> np.ndarray:
        ptr = self._llama.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def close(self) -> None:
        """Free the batches and the context (unless borrowed)."""
        if getattr(self, "ptr", None):
            self._llama.llama_batch_free(self._tok)
            self._llama.llama_batch_free(self._emb)
            if self._owned:
                self._llama.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()


class Sampler:
    """llama.cpp's sampler chain: a grammar (GBNF) if given, logit bias, frequency and presence penalties over the
    tokens generated so far (OpenAI's: logit - frequency * count - presence * (count > 0)), then greedy at
    temperature 0, else top-k, top-p, temperature and a seeded draw."""

    def __init__(self, model: TextModel, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 seed: int | None = None, logit_bias: dict[int, float] | None = None, grammar: str | None = None,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, penalty_window: int = 4096):
        llama = self._llama = model._llama
        self.ptr = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if grammar is not None:
            # First in the chain: tokens the grammar forbids are out before anything else chooses.
            engine.take_log()
            constrained = llama.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
            if not constrained:
                self.close()
                raise engine.failure("llama.cpp could not parse the grammar")
            llama.llama_sampler_chain_add(self.ptr, constrained)
        if logit_bias:
            if any(not 0 <= t < model.n_vocab for t in logit_bias):
                raise Llama3vError(f"logit_bias names a token outside the vocabulary of {model.n_vocab}")
            biases = (llama.llama_logit_bias * len(logit_bias))(
                *(llama.llama_logit_bias(token=t, bias=b) for t, b in logit_bias.items()))
            llama.llama_sampler_chain_add(self.ptr, llama.llama_sampler_init_logit_bias(
                model.n_vocab, len(logit_bias), biases))
        if frequency_penalty or presence_penalty:
            llama.llama_sampler_chain_add(self.ptr, llama.llama_sampler_init_penalties(
                model.n_vocab, penalty_window, 1.0, frequency_penalty, presence_penalty))
        if temperature <= 0:
            llama.llama_sampler_chain_add(self.ptr, llama.llama_sampler_init_greedy())
            return
        llama.llama_sampler_chain_add(self.ptr, llama.llama_sampler_init_top_k(top_k))
        llama.llama_sampler_chain_add(self.ptr, llama.llama_sampler_init_top_p(top_p, 1))
        llama.llama_sampler_chain_add(self.ptr, llama.llama_sampler_init_temp(temperature))
        seed = 0xFFFFFFFF if seed is None else seed & 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random
        llama.llama_sampler_chain_add(self.ptr, llama.llama_sampler_init_dist(seed))

    def sample(self, ctx: Context, seq: int = 0) -> int:
        """Draw the next token from sequence `seq`'s last decoded position's logits."""
        return int(self._llama.llama_sampler_sample(self.ptr, ctx.ptr, ctx.output_index(seq)))

    def close(self) -> None:
        """Free the chain."""
        if getattr(self, "ptr", None):
            self._llama.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()
