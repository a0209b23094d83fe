"""Continuous batching: sequences that join and leave a shared batch decode exactly as they would alone."""

import threading

import pytest

import lmforge
from lmforge.generate.sampling import SamplingConfig
from lmforge.serve.scheduler import Event, QueueFull, Scheduler, SequenceRequest

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def lm(base_run):
    return lmforge.load(base_run, device="cpu")


def sequence(lm, prompt, sampling=GREEDY, index=0):
    events: list[Event] = []
    request = SequenceRequest(lm.encode_prompt(prompt), sampling, events.append, index=index)
    return request, events


def drain(scheduler):
    while scheduler.live or scheduler.waiting:
        scheduler.step()


def text_of(events):
    return "".join(event.text for event in events)


def alone(lm, prompt, sampling=GREEDY):
    """The completion LM.complete gives for this prompt decoded on its own."""
    return lm.complete([prompt], **vars(sampling))[0]


def with_budget(tokens):
    return SamplingConfig(**{**vars(GREEDY), "max_new_tokens": tokens})


@pytest.mark.parametrize("compiled", [False, True])
def test_sequences_joining_and_leaving_decode_as_alone(lm, compiled):
    # compiled: `lmforge serve --compile`, compiled steps for up to 4 rows; the same text as eager decoding alone.
    prompts = ["第1句的颜色是红", "第22句", "颜色", "第300句的颜色是蓝色的吗", "绿"]
    budgets = [12, 3, 9, 12, 5]
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=3, compiled=compiled)
    runs = [sequence(lm, prompt, with_budget(budget)) for prompt, budget in zip(prompts, budgets)]
    scheduler.submit([runs[0][0], runs[1][0]])
    scheduler.step()
    scheduler.step()
    scheduler.submit([run[0] for run in runs[2:]])  # one joins now (3 slots), two wait for slots to free
    drain(scheduler)
    assert scheduler.largest_batch == 3
    for (request, events), prompt in zip(runs, prompts):
        expected = alone(lm, prompt, request.sampling)
        assert text_of(events) == expected.text, prompt
        assert events[-1].finish_reason == expected.finish_reason
        assert events[-1].completion_tokens == expected.completion_tokens
        assert all(event.finish_reason is None for event in events[:-1])
    assert scheduler.engine.cache is None and not scheduler.engine.rows  # everything freed


def test_batching_takes_fewer_steps_than_sequential(lm):
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=8)
    runs = [sequence(lm, f"第{i}句的颜色是", index=i) for i in range(8)]
    scheduler.submit([request for request, _ in runs])
    drain(scheduler)
    tokens = sum(events[-1].completion_tokens for _, events in runs)
    assert scheduler.steps <= max(events[-1].completion_tokens for _, events in runs)
    assert tokens > 2 * scheduler.steps


def test_cancelled_sequence_frees_its_slot_and_trims_the_cache(lm):
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=2)
    long_prompt, long_events = sequence(lm, "第100句的颜色是红色还是绿色还是蓝色")
    short, short_events = sequence(lm, "红")
    waiting, waiting_events = sequence(lm, "蓝")
    scheduler.submit([long_prompt, short, waiting])
    scheduler.step()
    assert len(scheduler.live) == 2 and len(scheduler.waiting) == 1
    padded_length = scheduler.engine.cache.length
    long_prompt.cancel()
    scheduler.step()  # the cancelled row goes, the waiting one takes its slot
    assert [live.request for live in scheduler.live.values()] == [short, waiting]
    assert scheduler.engine.cache.length < padded_length  # the long prompt's columns were trimmed
    drain(scheduler)
    assert long_events[-1].finish_reason is None  # a cancelled sequence gets no more events
    assert text_of(waiting_events) == alone(lm, "蓝").text
    assert text_of(short_events) == alone(lm, "红").text


def test_seeded_sampling_repeats_whatever_else_is_in_the_batch(lm):
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=7)
    first, first_events = sequence(lm, "第5句", sampling)
    scheduler = Scheduler(lm.model, lm.tokenizer)
    scheduler.submit([first])
    drain(scheduler)
    second, second_events = sequence(lm, "第5句", sampling)
    neighbours = [sequence(lm, "绿", SamplingConfig(max_new_tokens=10, temperature=1.0))[0] for _ in range(3)]
    scheduler.submit([second, *neighbours])
    drain(scheduler)
    assert text_of(first_events) == text_of(second_events)


def test_stop_strings_and_context_limit(lm):
    scheduler = Scheduler(lm.model, lm.tokenizer)
    # A random model writes odd bytes; stop at the first letter or Han character it writes after two characters.
    outputs = [(prompt, alone(lm, prompt).text) for prompt in ("第9句", "红", "颜色", "第1句的颜色是", "绿", "第22句")]
    prompt, text, stop_at = next((p, t, c) for p, t in outputs for c in t[2:] if c.isalnum())
    stopped, stopped_events = sequence(lm, prompt)
    stopped.stop = [stop_at]
    near_end, near_end_events = sequence(lm, "颜色" * 20, with_budget(10_000))
    scheduler.submit([stopped, near_end])
    drain(scheduler)
    assert text_of(stopped_events) == text[: text.index(stop_at)]
    assert stopped_events[-1].finish_reason == "stop"
    context = lm.model.config.max_position_embeddings
    assert len(near_end.prompt_ids) + near_end_events[-1].completion_tokens <= context
    if near_end_events[-1].finish_reason == "length":
        assert len(near_end.prompt_ids) + near_end_events[-1].completion_tokens == context


def test_full_queue_refuses_all_or_nothing(lm):
    scheduler = Scheduler(lm.model, lm.tokenizer, max_queue=2)
    scheduler.submit([sequence(lm, "红")[0]])
    with pytest.raises(QueueFull):
        scheduler.submit([sequence(lm, "红")[0], sequence(lm, "绿")[0]])
    assert len(scheduler.waiting) == 1


def test_the_thread_serves_until_stopped(lm):
    scheduler = Scheduler(lm.model, lm.tokenizer)
    scheduler.start()
    try:
        finished = threading.Event()
        events = []

        def emit(event):
            events.append(event)
            if event.finish_reason:
                finished.set()

        scheduler.submit([SequenceRequest(lm.encode_prompt("红"), GREEDY, emit)])
        assert finished.wait(10)
        assert text_of(events) == alone(lm, "红").text
    finally:
        scheduler.stop()
