"""Chat templates: the model's own Jinja template (from its GGUF, or a file), rendered and tokenized.

Rendering follows Hugging Face transformers' apply_chat_template (transformers 5.x,
utils/chat_template_utils.py) so the text is what the model was fine-tuned on: a sandboxed
Jinja environment with trim_blocks, lstrip_blocks and loopcontrols; raise_exception and
strftime_now; a tojson that does not HTML-escape; a no-op {% generation %} tag; variables
messages, add_generation_prompt, bos_token, eos_token, tools=None, documents=None.

Tokenizing keeps the user's text apart from the template's markup: text a user types
("</s>", "[INST]", "<|im_start|>system") is always text, never a control token. Each message
content is rendered as a unique placeholder, so the rendered string splits into markup (the
template's) and content (the user's); only markup is searched for control tokens. The result
equals llama.cpp tokenizing the whole rendered string with special-token parsing, whenever the
content holds no control-token text (see tokenize_chat).
"""
from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidParameter

if TYPE_CHECKING:
    from .model import LlamaModel

Segment = tuple[str, bool]  # (text, is_content): content is a message's text, the rest the template's markup


# --- the Jinja environment, as transformers builds it -------------------------------------------

class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} marks assistant text for transformers' training masks;
    rendering outputs its body unchanged. Without it, templates that use the tag do not compile."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, >, & and '; transformers' does not, and templates expect its output.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """dict() and dict.fromkeys() only: the bare type would hand the template its other attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace() that refuses underscore names, as transformers' does (a path to CPython internals)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


class ChatTemplate:
    """A compiled chat template. `origin` says where it came from: "gguf" or "file"."""

    def __init__(self, source: str, bos_token: str, eos_token: str, origin: str):
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise InvalidParameter("chat_template", f"not a valid Jinja template: line {e.lineno}: {e.message}") from None
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False) renders it.
        Raises InvalidParameter("messages", ...) when the template refuses the messages."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, tools=None, documents=None)
        except jinja2.exceptions.TemplateError as e:  # raise_exception(), undefined names, sandbox refusals
            raise InvalidParameter("messages", f"the model's chat template refused these messages: {e.message or e}") from None
        except Exception as e:  # the template is the model's code, not ours: any failure is about these messages
            raise InvalidParameter("messages", f"the model's chat template failed on these messages ({type(e).__name__}: {e})") from None

    def segments(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[Segment]:
        """The rendered conversation as markup and content pieces, in order; their texts joined equal render()."""
        for m in messages:
            if not isinstance(m.get("content"), str):
                raise InvalidParameter("messages", "each message needs a string content")
        nonce = secrets.token_hex(8)
        while any(nonce in m["content"] for m in messages):
            nonce = secrets.token_hex(8)
        masked, cores = [], []
        for i, m in enumerate(messages):
            # The placeholder keeps the content's leading and trailing whitespace, so a template that
            # strips or trims the content (Llama 2's .strip(), Llama 3's | trim) strips the same.
            content = m["content"]
            core = content.strip()
            start = len(content) - len(content.lstrip())
            lead, trail = content[:start], content[start + len(core):]
            masked.append({**m, "content": f"{lead}ph{nonce}x{i}x{trail}"})
            cores.append(core)
        parts = re.split(f"ph{nonce}x(\\d+)x", self.render(masked, add_generation_prompt))
        out: list[Segment] = []
        for k, part in enumerate(parts):  # markup, index, markup, index, ..., markup
            text, is_content = (cores[int(part)], True) if k % 2 else (part, False)
            if text:
                out.append((text, is_content))
        # A template that does more to a content than trim it (split, replace, test it) renders the
        # placeholder differently from the text: then the pieces are not the conversation, and guessing
        # which characters are the user's could turn user text into control tokens. Refuse instead.
        if "".join(t for t, _ in out) != self.render(messages, add_generation_prompt):
            raise InvalidParameter("messages", "the model's chat template changes message text beyond trimming whitespace, "
                                               "so llamabox cannot keep that text apart from the template's control tokens")
        return out


# --- the model side: the GGUF's template and its control tokens (llama.cpp) ----------------------

def gguf_chat_template(model: LlamaModel) -> str | None:
    """The GGUF's tokenizer.chat_template, or None. Read from the metadata directly:
    llama_model_chat_template() returns a llama.cpp built-in template *name* for some GGUFs that lack one."""
    import gguf
    import llama_cpp

    key = gguf.Keys.Tokenizer.CHAT_TEMPLATE.encode()
    n = llama_cpp.llama_model_meta_val_str(model._model, key, None, 0)  # snprintf: the length, or -1 if absent
    if n < 0:
        return None
    buf = bytes(n + 1)
    llama_cpp.llama_model_meta_val_str(model._model, key, buf, len(buf))
    return buf[:n].decode("utf-8", errors="replace") or None


def token_text(model: LlamaModel, token: int) -> str:
    """A token's text as the vocabulary stores it ("<s>", "<|im_start|>"); "" for no token (-1)."""
    import llama_cpp

    if token < 0:
        return ""
    return (llama_cpp.llama_vocab_get_text(model._vocab, token) or b"").decode("utf-8", errors="replace")


def eos_token(model: LlamaModel) -> int:
    import llama_cpp

    return llama_cpp.llama_vocab_eos(model._vocab)


def tokenize_chat(model: LlamaModel, segments: list[Segment]) -> list[int]:
    """Token ids of rendered chat segments: control tokens only from markup, content always as text.

    llama.cpp tokenizing with special parsing splits the text at control tokens and encodes each
    text run between them on its own (for SentencePiece, with the leading space it adds at the start
    of a text and after each control token). This does the same, except that the split points come
    from markup only: each markup piece is tokenized with special parsing to find its control tokens,
    and every text run (markup text and message text around it, joined) is tokenized without. So the
    ids equal tokenizing the whole rendered string with special parsing when no message holds
    control-token text, and that text stays text when one does.

    BOS: a template that writes bos_token gets it as its first token; otherwise BOS is added when
    the model asks for it (add_bos_token), as for a plain prompt. Never twice.
    """
    import llama_cpp

    special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN  # what parse_special changes
    ids: list[int] = []
    run: list[str] = []  # text since the last control token

    def flush():
        text = "".join(run)
        run.clear()
        if text:
            ids.extend(model.tokenize(text, add_bos=False))

    for text, is_content in segments:
        if is_content:
            run.append(text)
            continue
        pos = 0
        for tok in model.tokenize(text, add_bos=False, special=True):
            if not llama_cpp.llama_vocab_get_attr(model._vocab, tok) & special:
                continue
            piece = token_text(model, tok)
            at = text.find(piece, pos) if piece else -1
            if at < 0:  # e.g. <unk> for a character SentencePiece cannot encode: not a match in the text
                continue
            run.append(text[pos:at])
            flush()
            ids.append(tok)
            pos = at + len(piece)
        run.append(text[pos:])
    flush()
    if model.add_bos and model.bos >= 0 and (not ids or ids[0] != model.bos):
        ids.insert(0, model.bos)
    return ids
