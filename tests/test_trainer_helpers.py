"""Shared helpers of the trainer tests (no tests here): a short real text written into a
store the way ingest lays a book out (manifest + per-part train/test jsonl)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from novelcrafter import layout
from novelcrafter.store import Store


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Train with one torch thread in these tests (import this fixture into a module to apply it).

    torch's OpenMP threads wait for each other at every operation; on a shared,
    oversubscribed CPU (the test machine runs several suites at once) a 2-thread run of
    tests/test_trainer_part.py was measured 20-40x slower than a 1-thread run.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Jane Austen, Pride and Prejudice (1813), chapter 1 — public domain.
AUSTEN = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is '
    'let at last?" Mr. Bennet replied that he had not. "But it is," returned she; "for Mrs. Long has '
    'just been here, and she told me all about it." Mr. Bennet made no answer. "Do you not want to '
    'know who has taken it?" cried his wife impatiently. "You want to tell me, and I have no '
    'objection to hearing it." This was invitation enough. "Why, my dear, you must know, Mrs. Long '
    "says that Netherfield is taken by a young man of large fortune from the north of England; that "
    "he came down on Monday in a chaise and four to see the place, and was so much delighted with it "
    "that he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, "
    'and some of his servants are to be in the house by the end of next week." "What is his name?" '
    '"Bingley." "Is he married or single?" "Oh! single, my dear, to be sure! A single man of large '
    'fortune; four or five thousand a year. What a fine thing for our girls!" "How so? how can it '
    'affect them?" "My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You must '
    'know that I am thinking of his marrying one of them." "Is that his design in settling here?" '
    '"Design! nonsense, how can you talk so! But it is very likely that he may fall in love with one '
    'of them, and therefore you must visit him as soon as he comes." "I see no occasion for that. '
    "You and the girls may go, or you may send them by themselves, which perhaps will be still "
    "better; for as you are as handsome as any of them, Mr. Bingley might like you the best of the "
    'party." "My dear, you flatter me. I certainly have had my share of beauty, but I do not pretend '
    "to be any thing extraordinary now. When a woman has five grown up daughters, she ought to give "
    'over thinking of her own beauty." "In such cases, a woman has not often much beauty to think '
    'of." "But, my dear, you must indeed go and see Mr. Bingley when he comes into the '
    'neighbourhood." "It is more than I engage for, I assure you." "But consider your daughters. '
    "Only think what an establishment it would be for one of them. Sir William and Lady Lucas are "
    "determined to go, merely on that account, for in general you know they visit no new comers. "
    'Indeed you must go, for it will be impossible for us to visit him, if you do not." "You are '
    "over scrupulous surely. I dare say Mr. Bingley will be very glad to see you; and I will send a "
    "few lines by you to assure him of my hearty consent to his marrying which ever he chooses of "
    'the girls; though I must throw in a good word for my little Lizzy." "I desire you will do no '
    "such thing. Lizzy is not a bit better than the others; and I am sure she is not half so "
    "handsome as Jane, nor half so good humoured as Lydia. But you are always giving her the "
    'preference." "They have none of them much to recommend them," replied he; "they are all silly '
    'and ignorant like other girls; but Lizzy has something more of quickness than her sisters." '
    '"Mr. Bennet, how can you abuse your own children in such way? You take delight in vexing me. '
    'You have no compassion on my poor nerves." "You mistake me, my dear. I have a high respect for '
    "your nerves. They are my old friends. I have heard you mention them with consideration these "
    'twenty years at least." "Ah! you do not know what I suffer." "But I hope you will get over it, '
    'and live to see many young men of four thousand a year come into the neighbourhood." '
    "Mr. Bennet was so odd a mixture of quick parts, sarcastic humour, reserve, and caprice, that "
    "the experience of three and twenty years had been insufficient to make his wife understand his "
    "character. Her mind was less difficult to develope. She was a woman of mean understanding, "
    "little information, and uncertain temper. When she was discontented she fancied herself "
    "nervous. The business of her life was to get her daughters married; its solace was visiting "
    "and news."
)


def sentences(text: str = AUSTEN) -> list[str]:
    """Naive sentence split: good enough to cut test chunks (ingest does it properly)."""
    out, current = [], ""
    for token in text.split(" "):
        current = f"{current} {token}".strip()
        if token.endswith((".", "?", "!", '."', '?"', '!"')) and len(current) > 40:
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


def chunks(per_chunk: int = 2) -> list[str]:
    s = sentences()
    return [" ".join(s[i : i + per_chunk]) for i in range(0, len(s), per_chunk)]


def write_book(
    store: Store,
    book_id: str,
    *,
    parts: int = 2,
    train_chunks: int = 4,
    test_chunks: int = 1,
    offset: int = 0,
) -> dict[str, Any]:
    """Lay out a book like ingest does; parts take consecutive chunks (wrapping round the text)."""
    pool = chunks()
    manifest_parts = []
    cursor = offset
    for index in range(parts):
        take = [pool[(cursor + i) % len(pool)] for i in range(train_chunks + test_chunks)]
        cursor += train_chunks + test_chunks
        train, test = take[:train_chunks], take[train_chunks:]
        store.put(
            layout.part_train_key(book_id, index), "".join(json.dumps({"text": t}) + "\n" for t in train)
        )
        store.put(layout.part_test_key(book_id, index), "".join(json.dumps({"text": t}) + "\n" for t in test))
        manifest_parts.append(
            {
                "index": index,
                "train_key": layout.part_train_key(book_id, index),
                "test_key": layout.part_test_key(book_id, index),
                "train_chunks": len(train),
                "test_chunks": len(test),
            }
        )
    manifest = {
        "book_id": book_id,
        "title": "Pride and Prejudice (test excerpt)",
        "source_sha256": book_id * 4,
        "pages": 1,
        "sentences": len(sentences()),
        "chunks": parts * (train_chunks + test_chunks),
        "words": len(AUSTEN.split()),
        "params": {"chunk_sentences": 2, "parts": parts, "test_fraction": 0.2, "seed": 0},
        "cleaning": {},
        "parts": manifest_parts,
        "created_at": 0.0,
        "warnings": [],
    }
    store.put_json(layout.manifest_key(book_id), manifest)
    return manifest
