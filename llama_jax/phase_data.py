"""What each phase of a run trains and evaluates on: its batches (text, chat or preference pairs) over its sources,
and its held-out sets, with the checks that the sources suit the objective. Built for every phase when the run
starts (`trainer.py`), so that a missing or unsuitable source of a late phase stops the run at once rather than
days later.
"""

from __future__ import annotations

import dataclasses

import grain
import ml_collections
import numpy as np

from llama_jax.config import PAIR_OBJECTIVES
from llama_jax.data.corpus import load_corpus, source_specs
from llama_jax.data.documents import BUILTIN_CHAT_SOURCES, BUILTIN_SOURCES
from llama_jax.data.pipeline import PreferenceBatches, StreamPosition, TrainBatches, eval_batches, eval_pair_batches
from llama_jax.data.preferences import is_preference_store
from llama_jax.errors import ConfigError
from llama_jax.parallel import distributed
from llama_jax.parallel.mesh import batch_share, make_mesh
from llama_jax.phases import Phase, RunPlan

# Reader threads build the next batches while the step runs; grain keeps their order, so batches stay deterministic.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass
class PhaseData:
    """A phase's training batches and held-out sets."""

    batches: TrainBatches | PreferenceBatches
    # source name -> this process's held-out batches; the training sources' first, then data.eval_sources'
    eval_sets: dict[str, list[dict[str, np.ndarray]]]
    share: dict[str, int]  # the rows of each batch this process reads: its block of equal ones (`_share`)

    def iterator(self) -> grain.DatasetIterator:
        return iter(self.batches.dataset(**self.share).to_iter_dataset(_READ_OPTIONS))


@dataclasses.dataclass
class _SourceRead:
    """A source (by its origin, the same documents whatever a phase's mixture calls them, and which of a mixture's
    entries of that origin it is) as the run's phases read it: its stream's seed, the same in every phase, and where
    the phases so far stopped reading it."""

    key: int  # its place among the run's sources, in the order phases first read them
    position: StreamPosition | None = None


def run_data(plan: RunPlan, first_corpus, pad_id: int) -> list[PhaseData]:
    """Every phase's data. A phase reading a source that an earlier phase read goes on where that phase stopped, in
    the same order of its documents: the Llama 3 recipe's batch doublings and long-context stages are phases over one
    mixture, and starting each over repeated documents the run had trained on and skipped others."""
    read: dict[tuple[str, str, int], _SourceRead] = {}
    return [phase_data(p, first_corpus, pad_id, read, last=p.index + 1 == len(plan.phases)) for p in plan.phases]


def phase_data(p: Phase, first_corpus, pad_id: int, read: dict[tuple[str, str, int], _SourceRead] | None = None,
               last: bool = True) -> PhaseData:
    """The first phase reads the corpus already loaded; a later one its own sources, with the run's tokenizer,
    sharing the stores of those the first reads too. `read`: the run's sources as the phases before read them
    (`run_data`), updated with this phase's reading unless it is the `last`."""
    read = {} if read is None else read
    cfg = p.cfg
    corpus = first_corpus if p.index == 0 else distributed.process_zero_first(
        lambda: load_corpus(cfg.data, cfg.model.vocab_size, run=first_corpus), "preparing the data")
    processes = _share(cfg)
    if cfg.objective.name in PAIR_OBJECTIVES:
        return _pair_data(p, corpus, pad_id, processes)
    _check_no_preference_sources(cfg, corpus)
    if cfg.objective.name == "sft":
        _check_chat_sources(cfg, corpus)
    origins = [s.origin for s in corpus.sources]
    sources = [read.setdefault((*origin, origins[:i].count(origin)), _SourceRead(len(read)))  # a mixture may repeat one
               for i, origin in enumerate(origins)]
    batches = TrainBatches([s.train for s in corpus.sources], [s.weight for s in corpus.sources], p.batches,
                           seed=cfg.seed + p.index, shuffle_window=cfg.data.shuffle_window,
                           names=[s.name for s in corpus.sources], pad_id=pad_id,
                           stream_seeds=[(cfg.seed, source.key) for source in sources],
                           starts=[source.position for source in sources], stop_step=None if last else p.num_steps)
    if not last:
        for source, position in zip(sources, batches.end_positions()):
            source.position = position
    eval_sets = {
        source.name: list(eval_batches(source.eval, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                       max_batches=cfg.data.eval_batches, pad_id=pad_id, **processes))
        for source in corpus.sources
    }
    for name, store in corpus.held_out.items():  # data.eval_sources
        eval_sets[name] = list(eval_batches(store, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                            max_batches=cfg.data.eval_batches, pad_id=pad_id, **processes))
    return PhaseData(batches, eval_sets, processes)


def _share(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """The block of every batch's rows that this process's devices hold on the phase's mesh, as the pipeline's
    (process_index, process_count): processes apart only along a non-batch mesh axis read the same rows."""
    index, count = batch_share(make_mesh(cfg.mesh))
    return dict(process_index=index, process_count=count)


def _check_no_preference_sources(cfg: ml_collections.ConfigDict, corpus) -> None:
    """A preference corpus holds each pair as two documents, prompt + chosen and prompt + rejected, each with its
    response's loss mask: trained on as text or chat, it taught the rejected responses as much as the chosen, and as
    an evaluation set it scored them alike."""
    pairs = [source.name for source in corpus.sources if is_preference_store(source.train)]
    if pairs:
        raise ConfigError(
            f"objective.name={cfg.objective.name!r} would learn the rejected responses of the preference pairs in "
            f"source(s) {pairs} as much as the chosen ones: train on pairs with objective.name='dpo' or 'reward', or "
            "prepare the chosen conversations alone with python -m llama_jax.data.prepare --chat and train on those"
        )
    held_out = [name for name, store in corpus.held_out.items() if is_preference_store(store)]
    if held_out:
        raise ConfigError(
            f"data.eval_sources {held_out} hold preference pairs, whose rejected responses an "
            f"objective.name={cfg.objective.name!r} run would score as much as the chosen ones: evaluate on the chosen "
            "conversations alone (python -m llama_jax.data.prepare --chat), or score pairs in a DPO or reward run"
        )


def check_sources_prepared(cfg: ml_collections.ConfigDict) -> None:
    """SFT trains on prepared conversations, reward and DPO on prepared pairs. Files that are not were first tokenized
    as text: conversations or pairs failed for want of a "text" field, files that had one only after the whole corpus
    was tokenized."""
    kind = {"sft": ("conversations", "prepare --chat", " (plain text has no assistant turns to learn: "
                    "objective.name='lm' trains on every token)"),
            "reward": ("preference pairs", "preferences", ""), "dpo": ("preference pairs", "preferences", "")}
    if cfg.objective.name not in kind:
        return
    built_in = (*BUILTIN_SOURCES, *BUILTIN_CHAT_SOURCES)  # text ones: `_check_chat_sources` and `_pair_data` say so
    raw = [spec for spec in source_specs(cfg.data) if spec.source not in built_in and not spec.prepared]
    if raw:
        what, command, text = kind[cfg.objective.name]
        key = f"data.mixture.{raw[0].name}.source" if cfg.data.mixture else "data.source"
        raise ConfigError(
            f"objective.name={cfg.objective.name!r} trains on prepared {what}, but source {raw[0].name!r} "
            f"({raw[0].source}) is not prepared: prepare its {what} with python -m llama_jax.data.{command} --source "
            f"{raw[0].source} --tokenizer T --out DIR and set {key}=DIR{text}"
        )


def _check_chat_sources(cfg: ml_collections.ConfigDict, corpus) -> None:
    """SFT learns the assistant's turns only: every source must carry the chat loss masks."""
    plain_text = [source.name for source in corpus.sources if not source.train.has_loss_mask]
    if plain_text:
        raise ConfigError(
            f"objective.name='sft' trains on chat data, but source(s) {plain_text} are plain text (no loss mask): "
            "prepare conversations with python -m llama_jax.data.prepare --chat --source CHATS.jsonl --tokenizer T "
            "--out DIR and set data.source=DIR (or objective.name='lm' to train on every token)"
        )


def _pair_data(p: Phase, corpus, pad_id: int, processes: dict) -> PhaseData:
    """Preference pairs (objective reward / dpo): one source prepared by `python -m llama_jax.data.preferences`."""
    cfg = p.cfg
    source = corpus.sources[0]
    if not is_preference_store(source.train):
        raise ConfigError(
            f"objective.name={cfg.objective.name!r} trains on preference pairs, but data.source={cfg.data.source!r} "
            "is not a preference corpus: prepare it with python -m llama_jax.data.preferences --source PAIRS.jsonl "
            "--tokenizer T --out DIR and set data.source=DIR"
        )
    batches = PreferenceBatches(source.train, p.batches, seed=cfg.seed + p.index, pad_id=pad_id, name=source.name)
    sizes = dict(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, max_batches=cfg.data.eval_batches,
                 pad_id=pad_id, **processes)
    eval_sets = {source.name: eval_pair_batches(source.eval, **sizes)}
    for name, store in corpus.held_out.items():  # data.eval_sources: pairs, or for DPO also text (what it forgets)
        if is_preference_store(store):
            eval_sets[name] = eval_pair_batches(store, **sizes)
        elif cfg.objective.name == "dpo":
            eval_sets[name] = eval_batches(store, **sizes)
        else:
            raise ConfigError(f"data.eval_sources.{name} is not a preference corpus, and a reward model scores pairs "
                              "only: prepare it with python -m llama_jax.data.preferences, or remove it")
    return PhaseData(batches, eval_sets, processes)
