"""An edition's furniture on generated books with known ground truth: publisher and
transcriber notices (in two languages, from two publishers), contents and lists of
illustrations, a pronunciation guide, footnotes and their marks, lead-ins before quotations;
and, beside them, the author's own text that looks a little like them and must stay."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from novelcrafter.ingest.chunking import make_chunks
from novelcrafter.ingest.clean import clean_pages, take_raised
from novelcrafter.ingest.extract import Page
from novelcrafter.ingest.extract_sandbox import FLAG_RAISED, RAISED_CLOSE, RAISED_OPEN
from novelcrafter.ingest.params import IngestParams
from novelcrafter.ingest.pipeline import ingest
from novelcrafter.ingest.sentences import Sentence
from pdfs import (
    Book,
    Columns,
    Heading,
    LeaderList,
    PageBreak,
    Paragraph,
    Picture,
    book_pdf,
    footnote_lines,
    lines_of,
    prose,
    sentences,
    unmarked,
)

from novelcrafter import layout
from novelcrafter.store import open_store


@dataclass
class Publisher:
    front: list[Paragraph]
    back: list[Paragraph]


# Two editions' notices with the same structure: a notice paragraph with the publisher's
# address, a run of fields, a banner, a credit line, a transcriber's note; at the back an end
# line, a banner and a licence (numbered clauses, the address again).
GUTENBERG_LIKE = Publisher(
    front=[
        Paragraph(
            lines=["The Project Gutenberg EBook of The Lighthouse Keeper, by A. N. Author"], indent=False
        ),
        Paragraph(
            "This eBook is for the use of anyone anywhere at no cost and with almost no restrictions "
            "whatsoever. You may copy it, give it away or re-use it under the terms of the Project "
            "Gutenberg License included with this eBook or online at www.gutenberg.org",
            indent=False,
        ),
        Paragraph(
            lines=[
                "Title: The Lighthouse Keeper",
                "Author: A. N. Author",
                "Illustrator: C. D. Painter",
                "Release Date: May 3, 2011 [EBook #4512]",
                "Language: English",
            ],
            indent=False,
        ),
        Paragraph(
            lines=["*** START OF THIS PROJECT GUTENBERG EBOOK THE LIGHTHOUSE KEEPER ***"], indent=False
        ),
        Paragraph(
            lines=["Produced by Jane Roe and the Online Distributed", "Proofreading Team"], indent=False
        ),
        Paragraph(
            "Transcriber's Note: Obvious typographical errors have been corrected. Inconsistent "
            "hyphenation has been retained.",
            indent=False,
        ),
    ],
    back=[
        Paragraph(lines=["End of the Project Gutenberg EBook of The Lighthouse Keeper"], indent=False),
        Paragraph(lines=["*** END OF THIS PROJECT GUTENBERG EBOOK THE LIGHTHOUSE KEEPER ***"], indent=False),
        Paragraph(
            "Updated editions will replace the previous one, and the old editions will be renamed. "
            "Creating the works from public domain print editions means that no one owns a United "
            "States copyright in these works, so the Foundation (and you!) can copy and distribute it "
            "in the United States without permission and without paying copyright royalties."
        ),
        Paragraph(
            "1.E.8. You may charge a reasonable fee for copies of or providing access to or "
            "distributing Project Gutenberg-tm electronic works provided that you pay a royalty fee "
            "of 20% of the gross profits you derive."
        ),
        Paragraph(
            "Most people start at our Web site which has the main PG search facility: "
            "www.gutenberg.org. This Web site includes information about Project Gutenberg-tm, "
            "including how to make donations."
        ),
    ],
)
OTHER_PUBLISHER_FRENCH = Publisher(
    front=[
        Paragraph(lines=["Le livre numérique Le Gardien du phare, de A. N. Auteur"], indent=False),
        Paragraph(
            "Ce livre numérique est offert à tous, partout, sans frais et presque sans restriction. "
            "Vous pouvez le copier, le donner ou le réutiliser selon les termes de la licence de la "
            "Bibliothèque Lumière, incluse dans ce livre ou en ligne sur www.bibliotheque-lumiere.fr",
            indent=False,
        ),
        Paragraph(
            lines=[
                "Titre : Le Gardien du phare",
                "Auteur : A. N. Auteur",
                "Illustrateur : C. D. Peintre",
                "Date de publication : 3 mai 2011 [livre nº 4512]",
                "Langue : français",
            ],
            indent=False,
        ),
        Paragraph(lines=["*** DÉBUT DU LIVRE NUMÉRIQUE LE GARDIEN DU PHARE ***"], indent=False),
        Paragraph(lines=["Numérisé par Jeanne Roux et l’équipe de relecture"], indent=False),
        Paragraph(
            "Note du transcripteur : les fautes d’impression évidentes ont été corrigées ; "
            "l’orthographe d’origine a été conservée.",
            indent=False,
        ),
    ],
    back=[
        Paragraph(lines=["Fin du livre numérique de la Bibliothèque Lumière"], indent=False),
        Paragraph(lines=["*** FIN DU LIVRE NUMÉRIQUE LE GARDIEN DU PHARE ***"], indent=False),
        Paragraph(
            "Les éditions mises à jour remplacent les précédentes, qui seront renommées. Personne ne "
            "détient de droit d’auteur sur ces œuvres : la fondation (et vous !) peut les copier et "
            "les distribuer sans permission et sans payer de droits."
        ),
        Paragraph(
            "1.E.8. Vous pouvez demander des frais raisonnables pour des copies des œuvres de la "
            "Bibliothèque Lumière, à condition de verser une redevance de 20 % des bénéfices bruts."
        ),
        Paragraph(
            "Pour en savoir plus, consultez notre site : www.bibliotheque-lumiere.fr, qui explique "
            "aussi comment faire un don."
        ),
    ],
)

CONTENTS = LeaderList("CONTENTS", [(["Chapter I. The Lamp"], "5"), (["Chapter II. The Boats"], "11")])
ILLUSTRATIONS = LeaderList(
    "LIST OF ILLUSTRATIONS",
    [
        (["The keeper at his lamp"], "Frontispiece"),
        (["“It is a bigger boat than I ever saw", "before”"], "9"),
        (["The harbour at dawn"], "12"),
        (["“They are all in but one,” he said"], "15"),
        (["Dr. Morrow on the path"], "18"),
    ],
    column_head="PAGE",
)
GUIDE = Columns(
    "PRONOUNCING VOCABULARY OF PROPER NAMES",
    [
        "ā as in āle, ă as in ăm, ē as in ēve, ĕ as in ĕnd",
        "ī as in īce, ĭ as in ĭll, ō as in ōld, ŏ as in ŏdd",
    ],
    [
        ["Hăr´ăld", "Hăr´-ăld", "Ăg´nĕs", "Ăg´-nĕs"],
        ["Mŏr´rōw", "Mŏr´-rō", "Hāle", "Hāl"],
        ["Ĕd´wĭn", "Ĕd´-wĭn", "Māo´rĭ", "Mä´-ō-rĭ"],
        ["Bĕr´trăm", "Bĕr´-trăm", "Wĭl´frĕd", "Wĭl´-frĕd"],
        ["Ŏs´wăld", "Ŏz´-wăld", "Rō´nă", "Rō´-nă"],
        ["Ĭs´ŏld", "Ĭz´-ōld", "Ēl´să", "Ēl´-să"],
    ],
)
# Footnotes three ways: raised marks with raised labels (as LaTeX sets them), a mark in the
# text's own size after the sentence (the label set on the note's line), a reference symbol.
NOTED = Paragraph(
    "The boats came in late that year, and the keeper wrote it down in the great ledger,[^1] as "
    "his father had done before him. Nobody in the village remembered a wetter spring,[^2] and the "
    "gulls stayed on the rocks.",
    notes={
        "1": "The ledger is kept in the harbour office to this day.",
        "2": "Eleven inches of rain fell in April, the parish records say, more than in any year "
        "before or since.",
    },
)
INLINE_NOTED = Paragraph(
    "The old man sighed and seemed loath to depart![^3] He stood by the door a long while.",
    notes={"3": "An old saying of the coast."},
    marks="inline",
    raised_labels=False,
)
STARRED = Paragraph(
    "The lamp was a Fresnel lens of the first order,[^*] and it turned all night.",
    notes={"*": "A lens of rings, cut from one glass."},
    raised_labels=False,
)
NOTED_PARAGRAPHS = [NOTED, INLINE_NOTED, STARRED]
# The author's own text that shares a trait with the furniture: it stays.
BOOK_EPIGRAPH = [
    Paragraph(
        lines=["They that go down to the sea in ships,", "that do business in great waters;"], indent=False
    ),
    Paragraph(lines=["— Psalm cvii"], indent=False),
]
CHAPTER_EPIGRAPH = [
    Paragraph(
        lines=["The sea is his, and he made it;", "and his hands prepared the dry land."], indent=False
    ),
    Paragraph(lines=["— Psalm xcv"], indent=False),
]
LEAD_IN = Paragraph("He cleared his throat, and read the words cut in the stone:")
QUOTATION = Paragraph(
    lines=["“Here lies a keeper of the light,", "Who kept it burning every night.”"], indent=False
)
DIALOGUE = Paragraph("“Listen to me,” said the keeper to his son, “and remember what I tell you now:")
ANSWER = Paragraph("“Never let the lamp go out while there is a boat on the sea.”")
MACRON = Paragraph("The Māori pilot came aboard at noon and took the wheel without a word.")
SMALL_QUOTE = Paragraph(
    lines=["“Qui mare tenet, eum necesse est rerum potiri,”", "as the old book says."], indent=False, size=9.0
)
AUTHORS = [*BOOK_EPIGRAPH, *CHAPTER_EPIGRAPH, LEAD_IN, QUOTATION, DIALOGUE, ANSWER, MACRON, SMALL_QUOTE]
PROSE = prose(60)


def furniture_book(publisher: Publisher, chapters: bool) -> Book:
    """The whole edition; ``chapters``: headings a reader (and the cleaner) can anchor on."""
    first, second = ("CHAPTER I", "CHAPTER II") if chapters else ("The Lamp", "The Boats")
    p = PROSE
    return Book(
        [
            *publisher.front,
            CONTENTS,
            ILLUSTRATIONS,
            PageBreak(),
            *BOOK_EPIGRAPH,
            Heading(first),
            *CHAPTER_EPIGRAPH,
            *p[:6],
            NOTED,
            *p[6:10],
            INLINE_NOTED,
            *p[10:14],
            STARRED,
            *p[14:18],
            Picture(["THE KEEPER AT HIS LAMP."]),
            *p[18:20],
            LEAD_IN,
            QUOTATION,
            *p[20:24],
            MACRON,
            DIALOGUE,
            ANSWER,
            *p[24:30],
            SMALL_QUOTE,
            Heading(second),
            *p[30:60],
            GUIDE,
            PageBreak(),
            *publisher.back,
        ]
    )


def _words(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(
    scope="module",
    params=[(GUTENBERG_LIKE, True), (GUTENBERG_LIKE, False), (OTHER_PUBLISHER_FRENCH, False)],
    ids=["gutenberg-like", "gutenberg-like-no-chapter-headings", "other-publisher-french"],
)
def edition(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    publisher, chapters = request.param
    store = open_store(str(tmp_path_factory.mktemp("furniture") / "store"))
    # One sentence per chunk: every lead-in would end a chunk if it were not joined.
    params = IngestParams(chunk_sentences=1, parts=2)
    manifest = ingest(store, book_pdf(furniture_book(publisher, chapters)), params=params).manifest
    text = store.get_text(layout.text_key(manifest["book_id"]))
    chunks = [
        line
        for part in manifest["parts"]
        for key in (part["train_key"], part["test_key"])
        for line in store.get_text(key).splitlines()
    ]
    return publisher, manifest, text, [json.loads(c)["text"] for c in chunks]


def test_notices_are_removed_and_counted(edition) -> None:  # type: ignore[no-untyped-def]
    publisher, manifest, text, _ = edition
    notice_lines = [line for p in publisher.front + publisher.back for line in lines_of(p)]
    assert manifest["cleaning"]["boilerplate_lines"] == len(notice_lines)
    flat = _words(text)
    for line in notice_lines:
        assert _words(line) not in flat, line
    assert not re.search(r"www\.|https?://|\w+@\w+\.\w+|\*\*\*|\b\w+ ?: \S", text)


def test_contents_and_list_of_illustrations_are_removed(edition) -> None:  # type: ignore[no-untyped-def]
    _, manifest, text, _ = edition
    cleaning = manifest["cleaning"]
    assert cleaning["toc_lines"] == 1 + len(CONTENTS.entries)  # title and entries
    entry_lines = sum(len(lines) for lines, _ in ILLUSTRATIONS.entries)
    assert cleaning["illustration_list_lines"] == 2 + entry_lines  # title, column head, entries
    assert not re.search(r"(\. ?){4,}", text)
    for leftover in ("bigger boat", "Frontispiece", "The harbour at dawn", "ILLUSTRATIONS", "PAGE"):
        assert leftover not in text


def test_pronunciation_guide_is_removed(edition) -> None:  # type: ignore[no-untyped-def]
    _, manifest, text, _ = edition
    assert manifest["cleaning"]["glossary_lines"] == 1 + len(GUIDE.key) + len(GUIDE.rows)
    assert "as in" not in text and "PRONOUNCING" not in text
    assert not set("ăĕĭŏŭ´\u0301") & set(text)
    assert MACRON.text in text  # a macron in the prose is the author's


def test_footnote_bodies_and_marks_are_removed(edition) -> None:  # type: ignore[no-untyped-def]
    _, manifest, text, _ = edition
    cleaning = manifest["cleaning"]
    notes = [line for p in NOTED_PARAGRAPHS for line in footnote_lines(p)]
    assert cleaning["footnote_lines"] == len(notes)
    assert cleaning["footnote_marks"] == sum(len(p.notes) for p in NOTED_PARAGRAPHS)
    flat = _words(text)
    for line in notes:
        assert _words(line) not in flat, line
    for paragraph in NOTED_PARAGRAPHS:
        assert _words(unmarked(paragraph.text)) in flat  # the sentence whole, its mark gone
    assert "depart! 3" not in flat and "ledger,1" not in flat and "order,*" not in flat


def test_the_authors_text_stays(edition) -> None:  # type: ignore[no-untyped-def]
    _, manifest, text, _ = edition
    flat = _words(text)
    for paragraph in AUTHORS:
        for line in lines_of(paragraph):
            assert _words(line) in flat, line
    for sentence in sentences(240):
        assert flat.count(sentence) == 1, sentence
    assert manifest["cleaning"]["captions"] == 1


def test_a_chunk_never_ends_on_a_lead_in(edition) -> None:  # type: ignore[no-untyped-def]
    _, manifest, _, chunks = edition
    assert manifest["cleaning"]["lead_ins_joined"] == 2  # the inscription's and the keeper's
    assert not [c for c in chunks if c.rstrip().endswith(":")]
    together = {
        _words(LEAD_IN.text): _words(" ".join(QUOTATION.lines or [])),
        _words(DIALOGUE.text): _words(ANSWER.text),
    }
    for lead_in, quotation in together.items():
        assert any(lead_in in _words(c) and quotation in _words(c) for c in chunks), lead_in


def test_lead_ins_move_the_chunk_boundary() -> None:
    sentences_ = [
        Sentence("One.", 0),
        Sentence("He said:", 0),
        Sentence("“Come in.”", 1),
        Sentence("Two.", 2),
        Sentence("Three.", 2),
        Sentence("She wrote:", 2),
        Sentence("“Yes.”", 3),
        Sentence("Four.", 4),
    ]
    counts: Counter[str] = Counter()
    chunks = make_chunks(sentences_, 2, counts)
    assert chunks == ["One. He said:\n“Come in.”", "Two. Three.", "She wrote:\n“Yes.”", "Four."]
    assert counts["lead_ins_joined"] == 1  # "She wrote:" is inside its chunk: nothing to move
    lead_ins = [Sentence(f"Lead {i}:", i) for i in range(9)]
    assert all(len(c.split("\n")) <= 4 for c in make_chunks(lead_ins, 2))  # bounded: twice the size


def test_raised_text_is_told_apart() -> None:
    def raised(text: str) -> str:
        return text.replace("{", RAISED_OPEN).replace("}", RAISED_CLOSE)

    assert take_raised(raised("the ledger,{1} as his father")) == ("the ledger, as his father", None, ["1"])
    assert take_raised(raised("{2}Eleven inches of rain")) == ("Eleven inches of rain", "2", [])
    assert take_raised(raised("on the 1{st} of May, M{lle} Roux")) == (
        "on the 1st of May, Mlle Roux",
        None,
        [],
    )
    assert take_raised(raised("a lens{*} and 10{2} rings{†}")) == ("a lens and 10² rings", None, ["*", "†"])


def test_a_list_with_leaders_inside_the_story_needs_rising_page_numbers(tmp_path: Path) -> None:
    """A bill of fare with dot leaders in the story is the author's; a list of plates is not."""
    bill = [
        Paragraph(lines=["Bread and cheese . . . . . . . . . . . . 4"], indent=False),
        Paragraph(lines=["A pint of ale . . . . . . . . . . . . . . 2"], indent=False),
        Paragraph(lines=["Lodging for the night . . . . . . . . . . 1"], indent=False),
    ]
    book = Book([Heading("CHAPTER I"), *prose(20), *bill, *prose(20, start=80)])
    store = open_store(str(tmp_path / "store"))
    manifest = ingest(store, book_pdf(book), params=IngestParams(chunk_sentences=2, parts=2)).manifest
    text = store.get_text(layout.text_key(manifest["book_id"]))
    assert manifest["cleaning"]["illustration_list_lines"] == 0
    assert all(_words(p.lines[0]) in _words(text) for p in bill if p.lines)


def test_an_address_in_the_story_is_the_authors(tmp_path: Path) -> None:
    """A web address in the last paragraph of a story, or a missing space after a full stop,
    is no publisher's notice: the paragraph stays."""
    ending = Paragraph(
        "She typed the address of the harbour office, www.saltmarrow-harbour.org, and waited "
        "for the page to load. Nothing came.The line was down again."
    )
    book = Book([Heading("CHAPTER I"), *prose(30), ending])
    store = open_store(str(tmp_path / "store"))
    manifest = ingest(store, book_pdf(book), params=IngestParams(chunk_sentences=2, parts=2)).manifest
    text = store.get_text(layout.text_key(manifest["book_id"]))
    assert manifest["cleaning"]["boilerplate_lines"] == 0
    assert _words(ending.text) in _words(text)


def _page(index: int, body: list[str], small: list[tuple[str, int]] = ()) -> Page:  # type: ignore[assignment]
    """A page as the extraction workers report it: a running head, full body lines at 11 pt
    from the top of the frame, ``small`` rows (text, flags) at 8.5 pt at its foot, a folio."""
    lines = [(170.0, 560.0, 250.0, 568.0, 8.5, "THE LIGHTHOUSE KEEPER", 0)]
    for n, text in enumerate(body):
        y = 520.0 - 16.0 * n
        lines.append((57.0, y, 343.0, y + 11.0, 11.0, text, FLAG_RAISED if RAISED_OPEN in text else 0))
    for n, (text, flags) in enumerate(small):
        y = 116.0 - 11.0 * n
        lines.append((57.0, y, 300.0, y + 8.5, 8.5, text, flags))
    lines.append((205.0, 40.0, 215.0, 49.0, 9.0, str(index + 1), 0))
    return Page(index, 420.0, 595.0, lines, [])


def test_a_footnote_broken_off_mid_sentence_continues_on_the_next_page() -> None:
    """Built from the worker's own line tuples (the geometry of a real page): a footnote that
    runs over to the next page goes whole; small print under a note that ended stays."""
    words = " ".join(sentences(400)).split()
    chunks = [" ".join(words[i : i + 9]) for i in range(0, len(words), 9)]
    pages = []
    for index in range(8):
        body = chunks[index * 26 : index * 26 + 26]
        small: list[tuple[str, int]] = []
        if index == 2:
            body[3] = f"and the keeper wrote it in the ledger,{RAISED_OPEN}1{RAISED_CLOSE} as his father did"
            body = body[:-2]
            small = [
                (
                    f"{RAISED_OPEN}1{RAISED_CLOSE}The ledger is kept in the harbour office, where the",
                    FLAG_RAISED,
                ),
                ("clerk keeps it in the back room beside the", 0),
            ]
        elif index == 3:
            body = body[:-1]
            small = [("great iron stove of the office.", 0)]
        elif index == 4:
            body = body[:-2]
            small = [("“Qui mare tenet, eum necesse est rerum potiri,”", 0), ("as the old book says.", 0)]
        pages.append(_page(index, body, small))
    cleaned = clean_pages(pages)
    text = _words(cleaned.text)
    assert cleaned.counts["footnote_lines"] == 3 and cleaned.counts["footnote_marks"] == 1
    assert "the ledger, as his father did" in text
    for note in ("harbour office, where", "back room beside", "great iron stove"):
        assert note not in text
    assert "Qui mare tenet, eum necesse est rerum potiri,” as the old book says." in text


def test_a_transcribers_note_closing_the_book_on_its_own_page_goes(tmp_path: Path) -> None:
    note = Paragraph(
        "Transcriber’s Notes: Punctuation has been made consistent. Variations in spelling and "
        "hyphenation were retained as they appear in the original publication.",
        indent=False,
    )
    book = Book([Heading("CHAPTER I"), *prose(30), PageBreak(), note])
    store = open_store(str(tmp_path / "store"))
    manifest = ingest(store, book_pdf(book), params=IngestParams(chunk_sentences=2, parts=2)).manifest
    text = store.get_text(layout.text_key(manifest["book_id"]))
    assert manifest["cleaning"]["boilerplate_lines"] == len(lines_of(note))
    assert "Punctuation has been" not in text
    assert all(p.text in text for p in prose(30))
