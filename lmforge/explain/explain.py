"""`LM.explain` and `lmforge explain`: one text through attention maps, attributions and the logit lens.

Knows how each family's input is laid out (a classifier's `<bos> text <eos>`, a decoder's `<bos> prompt` +
continuation, an encoder-decoder's source and target) and checks what the user asked for; the arrays come from
attention.py, lens.py and attribution.py, the pictures from render.py. Takes any object with `model`,
`tokenizer`, `labels` and `generate` (an `LM`), so it never imports lm.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import Note, UserError
from lmforge.explain.attention import head_summary, record_attention
from lmforge.explain.attribution import gradient_times_input, integrated_gradients, occlusion
from lmforge.explain.lens import logit_lens
from lmforge.explain.probe import Probe, classifier_probe, decoder_probe, seq2seq_probe, to_device
from lmforge.generate.seq2seq_search import greedy_search
from lmforge.models import family_of

# Control characters have no glyph: a token label shows ↵ for a newline, ⇥ for a tab, an escape for the rest.
CONTROL_PICTURES = {chr(code): f"\\x{code:02x}" for code in (*range(32), 127)} | {"\n": "↵", "\t": "⇥"}
LONG_INPUT = 64  # tokens; attributing more than this many says what it will cost first


@dataclass
class Explanation:
    """Everything `explain` found for one text, as numpy arrays over its tokens (padding removed)."""

    family: str  # decoder, encoder or seq2seq
    text: str
    target: str  # the label (classifier) or the continuation (decoder, encoder-decoder) explained
    tokens: list[str]  # the input the attributions cover: the text, prompt or source, special tokens included
    attention_tokens: dict[str, tuple[list[str], list[str]]]  # per stack: (query tokens, key tokens)
    attention: dict[str, np.ndarray]  # per stack: (layers, heads, queries, keys), rows sum to 1
    heads: dict[str, dict[str, np.ndarray]]  # per stack: entropy, distance, special -> (layers, heads)
    integrated_gradients: np.ndarray  # (len(tokens),)
    gradient_x_input: np.ndarray
    occlusion: np.ndarray  # f(x) - f(x without the token); 0 for special tokens, which are never left out
    score: float  # the explained log-probability f(x)
    baseline_score: float  # f(baseline): every attributed token's embedding replaced by <pad>'s
    completeness_error: float  # |sum(integrated_gradients) - (score - baseline_score)| / |score - baseline_score|
    steps: int
    probabilities: dict[str, float] = field(default_factory=dict)  # a classifier's labels
    lens: dict | None = None  # decoders: tokens, top (layers, T, k) strings and probs, rank (layers, T)

    def save(self, folder: str | Path) -> list[Path]:
        """PNG pictures and the offline HTML viewer in `folder`; returns the files written."""
        from lmforge.explain.render import save_explanation

        return save_explanation(self, Path(folder))


def explain(
    lm, text: str, *, target: str | None = None, continuation: str | None = None, steps: int = 64,
    max_new_tokens: int = 16, top_k: int = 5,
) -> Explanation:  # fmt: skip
    """Explain one text with `lm` (see `LM.explain`)."""
    if not text.strip():
        raise UserError("nothing to explain: the text is empty")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, not {steps}")
    family = family_of(lm.model)
    if family == "encoder":
        if continuation is not None:
            raise UserError("--continuation is for decoders and encoder-decoders; this model is a classifier")
        probe, target = _classifier(lm, text, target)
    else:
        if target is not None:
            raise UserError(f"--target names a classifier's label; this model is a {family}: use --continuation")
        probe, target = (_decoder if family == "decoder" else _seq2seq)(lm, text, continuation, max_new_tokens)
    return _explain_probe(lm, to_device(probe, lm.device), text, target, steps, top_k)


def _classifier(lm, text: str, target: str | None) -> tuple[Probe, str]:
    model, tokenizer = lm.model, lm.tokenizer
    if model.classification_head is None:
        raise UserError(f"this encoder has the '{model.config.head}' head; explain works on classifiers")
    labels = lm.labels or [str(index) for index in range(model.config.num_labels)]
    row = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    _check_context(len(row), model.config.max_position_embeddings, "the text")
    if target is None:
        with torch.no_grad():
            logits = model(torch.tensor([row], device=lm.device))  # (1, labels)
        target = labels[int(logits.argmax())]
    if target not in labels:
        raise UserError(f"unknown label '{target}'; this classifier's labels: {', '.join(labels)}")
    return classifier_probe(tokenizer, [row], [labels.index(target)]), target


def _decoder(lm, text: str, continuation: str | None, max_new_tokens: int) -> tuple[Probe, str]:
    prompt = [lm.tokenizer.bos_id, *lm.tokenizer.encode(text)]
    context = lm.model.config.max_position_embeddings
    _check_context(len(prompt) + 1, context, "the text")
    if continuation is None:
        continuation = lm.generate(text, max_new_tokens=max_new_tokens, temperature=0)
    tail = _continuation_ids(lm.tokenizer, continuation)
    _check_context(len(prompt) + len(tail), context, "the text and its continuation")
    return decoder_probe(lm.tokenizer, [prompt], [tail]), continuation


def _seq2seq(lm, text: str, continuation: str | None, max_new_tokens: int) -> tuple[Probe, str]:
    model, tokenizer = lm.model, lm.tokenizer
    source = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    context = model.config.max_position_embeddings
    _check_context(len(source), context, "the text")
    if continuation is None:
        with torch.no_grad():
            ids = greedy_search(
                model, torch.tensor([source], device=lm.device), None, tokenizer.bos_id, tokenizer.eos_id,
                max_new_tokens,
            )[0]  # fmt: skip
        continuation = tokenizer.decode(ids)
    target = _continuation_ids(tokenizer, continuation)
    _check_context(len(target) + 1, context, "the continuation")
    return seq2seq_probe(tokenizer, [source], [target]), continuation


def _continuation_ids(tokenizer, continuation: str) -> list[int]:
    ids = tokenizer.encode(continuation)
    if not ids:
        raise UserError(f"the continuation {continuation!r} tokenizes to nothing; give another with --continuation")
    return ids


def _check_context(length: int, context: int, what: str) -> None:
    if length > context:
        raise UserError(f"{what} is {length} tokens with its special tokens; this model's context holds {context}")


def explain_reply(model, tokenizer, prompt_ids: list[int], reply_ids: list[int], steps: int = 16) -> dict:
    """A decoder's reply to a prompt (a rendered conversation), for the web page's explain view.

    attention: (reply tokens, prompt + reply - 1), the attention of the position that wrote each reply token over
    everything before it, averaged over layers and heads; attribution: integrated gradients of log p(reply |
    prompt) over the prompt tokens. Lighter than `explain`: no occlusion, no logit lens, no pictures.
    """
    device = next(model.parameters()).device
    probe = to_device(decoder_probe(tokenizer, [prompt_ids], [reply_ids]), device)
    with torch.no_grad(), record_attention(model, probe.query_masks) as maps:
        probe.score(model, probe.batch)
    length = len(prompt_ids) + len(reply_ids)
    writers = slice(len(prompt_ids) - 1, length - 1)  # position t writes token t + 1
    attention = maps["self"][:, 0].mean(dim=(0, 1))[writers, : length - 1]  # (R, P + R - 1)
    gradients = integrated_gradients(model, probe, steps)
    tokens = token_labels(tokenizer, [*prompt_ids, *reply_ids])
    return {
        "prompt_tokens": tokens[: len(prompt_ids)],
        "reply_tokens": tokens[len(prompt_ids) :],
        "attention": attention.cpu().numpy(),
        "attribution": gradients.attributions[0, : len(prompt_ids)].cpu().numpy(),
        "score": float(gradients.score[0]),
        "completeness_error": float(gradients.completeness_error[0]),
        "steps": steps,
    }


def strongest_tokens(
    model, tokenizer, rows: list[list[int]], labels: list[int], steps: int = 32, top: int = 3
) -> list[dict[str, list[tuple[str, float]]]]:
    """Per classifier row (`<bos> text <eos>`), the `top` tokens that pushed most toward `labels[row]` ("for") and
    against it ("against"), by integrated gradients of the label's log-probability; special tokens left out."""
    device = next(model.parameters()).device
    probe = to_device(classifier_probe(tokenizer, rows, labels), device)
    attributions = integrated_gradients(model, probe, steps).attributions.cpu()  # (B, T)
    specials = special_ids(tokenizer)
    found = []
    for row, values in zip(rows, attributions):
        scored = [(label, float(value)) for token, label, value in zip(row, token_labels(tokenizer, row), values)
                  if token not in specials]  # fmt: skip
        ranked = sorted(scored, key=lambda item: item[1], reverse=True)
        found.append({
            "for": [item for item in ranked[:top] if item[1] > 0],
            "against": [item for item in ranked[::-1][:top] if item[1] < 0],
        })  # fmt: skip
    return found


def _explain_probe(lm, probe: Probe, text: str, target: str, steps: int, top_k: int) -> Explanation:
    model, tokenizer = lm.model, lm.tokenizer
    specials = special_ids(tokenizer)
    ids = probe.batch["input_ids"][0]
    is_special = torch.tensor([int(i) in specials for i in ids], device=ids.device)
    attributed = probe.attributed[0]
    length = int(attributed.sum())
    if length > LONG_INPUT:
        warnings.warn(
            f"attributing {length} tokens: integrated gradients runs {steps} forward and backward passes over "
            f"all of them, occlusion {length} forward passes (--steps lowers the first)",
            Note,
            2,
        )
    with torch.no_grad(), record_attention(model, probe.query_masks) as maps:
        score = probe.score(model, probe.batch)
    if probe.family == "encoder":
        with torch.no_grad():
            logits = model(probe.batch["input_ids"], probe.batch["attention_mask"])[0].float()
        probabilities = dict(zip(lm.labels or map(str, range(len(logits))), logits.softmax(-1).tolist()))
    else:
        probabilities = {}
    gradients = integrated_gradients(model, probe, steps)
    occluded = occlusion(model, probe, probe.attributed & ~is_special[None])
    attention, attention_tokens, heads = _attention_arrays(probe, maps, tokenizer, specials)
    keep = attributed.cpu().numpy()
    return Explanation(
        family=probe.family, text=text, target=target,
        tokens=token_labels(tokenizer, ids[attributed].tolist()),
        attention_tokens=attention_tokens, attention=attention, heads=heads,
        integrated_gradients=gradients.attributions[0].cpu().numpy()[keep],
        gradient_x_input=gradient_times_input(model, probe)[0].cpu().numpy()[keep],
        occlusion=occluded[0].cpu().numpy()[keep],
        score=float(score[0]), baseline_score=float(gradients.baseline_score[0]),
        completeness_error=float(gradients.completeness_error[0]), steps=steps, probabilities=probabilities,
        lens=_lens(model, tokenizer, probe, top_k) if probe.family == "decoder" else None,
    )  # fmt: skip


def _attention_arrays(probe: Probe, maps: dict, tokenizer, specials: set[int]):
    """Per stack: one row's maps without padding, its (query, key) tokens, and its per-head summary."""
    batch = probe.batch
    source = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    if probe.family == "seq2seq":
        target = batch["decoder_input_ids"][0][batch["decoder_attention_mask"][0].bool()].tolist()
        sides = {"encoder": (source, source), "decoder": (target, target), "cross": (target, source)}
    else:
        sides = {"self": (source, source)}
    attention, tokens, heads = {}, {}, {}
    for name, (queries, keys) in sides.items():
        row = maps[name][:, 0, :, : len(queries), : len(keys)].cpu()  # (L, H, T, S)
        attention[name] = row.numpy()
        tokens[name] = (token_labels(tokenizer, queries), token_labels(tokenizer, keys))
        special = torch.tensor([token in specials for token in keys])
        summary = head_summary(row, torch.ones(len(queries), dtype=torch.bool), special)
        heads[name] = {key: value.numpy() for key, value in summary.items()}
    return attention, tokens, heads


def _lens(model, tokenizer, probe: Probe, top_k: int) -> dict:
    real = probe.batch["attention_mask"][0].bool()
    ids = probe.batch["input_ids"][0][real]
    expected = torch.cat([ids[1:], ids.new_tensor([-100])])  # each position's next token in the text
    lens = logit_lens(model, ids, expected, top_k)
    top = [[token_labels(tokenizer, position) for position in layer] for layer in lens.top_ids.tolist()]
    return {
        "tokens": token_labels(tokenizer, ids.tolist()),
        "top_tokens": top,
        "top_probs": lens.top_probs.cpu().numpy(),
        "rank": lens.target_rank.cpu().numpy(),
    }


def special_ids(tokenizer) -> set[int]:
    return {index for index, token in tokenizer.backend.get_added_tokens_decoder().items() if token.special}


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """How each token reads: its text, or a special token's name. A token holding part of a character (byte-level
    BPE splits rare characters) shows that character in parentheses: 今 split over two tokens reads (今), (今)天."""
    try:
        table = tokenizer.token_bytes()
    except KeyError:  # a WordPiece vocabulary (BERT) is text, not byte-level characters
        return [tokenizer.backend.id_to_token(token) for token in ids]
    data = b"".join(table[token] for token in ids)
    characters = _characters(data)  # (start, end, text) per character of the joined bytes
    labels, offset = [], 0
    for token in ids:
        start, end = offset, offset + len(table[token])
        offset = end
        if start == end:
            labels.append(tokenizer.backend.id_to_token(token))
            continue
        pieces = [
            text if start <= first and last <= end else f"({text})"
            for first, last, text in characters
            if first < end and last > start
        ]
        labels.append("".join(pieces))
    return labels


def _characters(data: bytes) -> list[tuple[int, int, str]]:
    """Byte spans of the UTF-8 characters in `data`; a byte that starts no valid character stands for itself."""
    spans, position = [], 0
    while position < len(data):
        for width in (1, 2, 3, 4):
            try:
                text = data[position : position + width].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            width, text = 1, f"\\x{data[position]:02x}"
        spans.append((position, position + width, CONTROL_PICTURES.get(text, text)))
        position += width
    return spans
