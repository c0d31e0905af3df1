"""EDA text augmentation: each operation, the synonym table and file, and the datamodule option
(training captions only, seeded per sample: identical on a rerun and after a mid-epoch resume)."""

import json
import random
from collections import Counter

import pytest

from datamodules import ImageTextDataModule
from datamodules.specs import TextAugmentSpec
from datamodules.stream import StreamingLoader
from datamodules.text_augment import SHAPES_SYNONYMS, TextAugment, load_synonyms
from tests._data import write_shards

CAPTION = "A large red circle in the center on a gray background"
WORDS = CAPTION.split()
# written out here, not read from the code's table: the words of CAPTION with synonyms, and theirs
HAS_SYNONYMS = {"large": {"big"}, "circle": {"disc"}, "center": {"middle", "centre"}, "gray": {"grey"},
                "background": {"backdrop"}}


def test_synonym_replacement_changes_only_words_with_synonyms():
    out = TextAugment(synonym=1.0)(CAPTION, random.Random(0)).split()
    assert len(out) == len(WORDS)
    for before, after in zip(WORDS, out):
        if before.lower() in HAS_SYNONYMS:  # rate 1: all 11 words -> n = 11 >= the 5 candidates: all replaced
            assert after in HAS_SYNONYMS[before.lower()], (before, after)
        else:
            assert after == before
    # rate 0.1 of 11 words -> exactly one replacement
    out = TextAugment(synonym=0.1)(CAPTION, random.Random(3)).split()
    assert sum(a != b for a, b in zip(WORDS, out)) == 1


def test_case_and_punctuation_are_kept():
    out = TextAugment(synonym=1.0, synonyms={"center": ["middle"]})("Center: a star", random.Random(0))
    assert out == "Middle: a star"


def test_insertion_adds_synonyms_of_caption_words():
    out = TextAugment(insert=0.3)(CAPTION, random.Random(1)).split()
    assert len(out) == len(WORDS) + 3  # round(0.3 * 11) = 3 insertions
    added = Counter(out) - Counter(WORDS)
    assert sum(added.values()) == 3
    assert all(any(w in syn for syn in HAS_SYNONYMS.values()) for w in added), added


def test_swap_permutes_and_delete_drops():
    seen_changed = False
    for seed in range(5):
        out = TextAugment(swap=0.2)(CAPTION, random.Random(seed)).split()
        assert sorted(out) == sorted(WORDS)
        seen_changed |= out != WORDS
    assert seen_changed
    # each word dropped with probability 0.5: over 300 captions about half of 3300 words survive
    kept = sum(len(TextAugment(delete=0.5)(CAPTION, random.Random(s)).split()) for s in range(300))
    assert 0.45 < kept / (300 * len(WORDS)) < 0.55
    # rate 1 deletes everything but one word, which is one of the caption's
    out = TextAugment(delete=1.0)(CAPTION, random.Random(0)).split()
    assert len(out) == 1 and out[0] in WORDS


def test_prob_and_one_operation_per_caption():
    assert TextAugment(delete=1.0, prob=0.0)(CAPTION, random.Random(0)) == CAPTION
    # prob 0.5: about half of the captions are left exactly as written
    same = sum(TextAugment(delete=1.0, prob=0.5)(CAPTION, random.Random(s)) == CAPTION for s in range(400))
    assert 160 < same < 240
    # two operations enabled: each caption gets one of them (a deletion to one word, or a swap)
    lengths = Counter(len(TextAugment(swap=0.1, delete=1.0)(CAPTION, random.Random(s)).split()) for s in range(200))
    assert set(lengths) == {1, len(WORDS)} and min(lengths.values()) > 60


def test_user_synonym_file_merges_over_the_builtin_table(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"Large": ["huge"], "caption": ["text"]}))
    table = load_synonyms(str(path))
    assert table["large"] == ["huge"] and table["caption"] == ["text"] and table["circle"] == SHAPES_SYNONYMS["circle"]
    assert load_synonyms(str(path), builtin=False) == {"large": ["huge"], "caption": ["text"]}
    with pytest.raises(ValueError, match="does not exist"):
        load_synonyms(str(tmp_path / "none.json"))
    path.write_text(json.dumps({"big": "large"}))
    with pytest.raises(ValueError, match="must map each word to a non-empty list"):
        load_synonyms(str(path))


def test_spec_refuses_bad_rates_by_name():
    with pytest.raises(ValueError, match=r"caption.augment.delete must be in \[0, 1\], got 1.5"):
        TextAugmentSpec(delete=1.5)
    with pytest.raises(ValueError, match="every rate .* is 0"):
        TextAugmentSpec()


# ---------------------------------------------------------------- the datamodule option


def _dm(directory, augment, workers=0):
    dm = ImageTextDataModule(shards={"train": directory, "val": directory},
                             stream={"batch_size": 4, "num_workers": workers, "shuffle_buffer": 6},
                             image={"size": 8}, caption={"augment": augment})
    dm.setup("fit")
    return dm


def _texts(batches):
    return [t for b in batches for t in b["text"]]


def test_training_captions_augmented_reproducibly_eval_untouched(tmp_path):
    write_shards(str(tmp_path), [8, 8])
    syn = tmp_path / "syn.json"
    syn.write_text(json.dumps({"caption": ["text", "label"]}))
    aug = {"synonym": 1.0, "prob": 1.0, "synonyms": str(syn)}
    batches = list(StreamingLoader(_dm(str(tmp_path), aug)._train, epoch_fn=lambda: 0))
    texts = _texts(batches)
    keys = [k for b in batches for k in b["key"]]
    # "caption {n}" -> "text {n}" or "label {n}", n the sample's own number
    assert all(t.split()[0] in ("text", "label") and t.split()[1] == str(int(k[1:])) for t, k in zip(texts, keys))
    assert {t.split()[0] for t in texts} == {"text", "label"}
    again = list(StreamingLoader(_dm(str(tmp_path), aug)._train, epoch_fn=lambda: 0))
    assert _texts(again) == texts
    other_epoch = list(StreamingLoader(_dm(str(tmp_path), aug)._train, epoch_fn=lambda: 1))
    assert _texts(other_epoch) != texts  # a new epoch draws new augmentations
    val = _texts(_dm(str(tmp_path), aug).val_dataloader())
    assert sorted(val) == sorted(f"caption {n}" for n in range(16))


def test_bad_synonym_file_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="caption.augment.synonyms: .* does not exist"):
        ImageTextDataModule(caption={"augment": {"synonym": 0.1, "synonyms": str(tmp_path / "x.json")}})


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_augmented_captions(tmp_path, workers):
    write_shards(str(tmp_path), [10, 14])
    aug = {"swap": 0.5, "delete": 0.3, "synonyms": None}
    full = list(StreamingLoader(_dm(str(tmp_path), aug, workers)._train, epoch_fn=lambda: 1, num_workers=workers))
    assert _texts(full) != [f"caption {int(k[1:])}" for b in full for k in b["key"]]  # augmented at all
    consumed = 2
    first = StreamingLoader(_dm(str(tmp_path), aug, workers)._train, epoch_fn=lambda: 1,
                            progress_fn=lambda: consumed, num_workers=workers)
    it = iter(first)
    for _ in range(consumed + 1):
        next(it)
    state = first.state_dict()
    del it
    resumed = StreamingLoader(_dm(str(tmp_path), aug, workers)._train, epoch_fn=lambda: 1, num_workers=workers)
    resumed.load_state_dict(state)
    assert _texts(list(resumed)) == _texts(full[consumed:])
