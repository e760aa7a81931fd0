"""Build the small PDFs that tests/test_sources.py reads; run once from the repo root, commit the outputs.

    .venv/bin/python tests/data/make_pdfs.py

Each page is drawn by hand (one content stream, the standard Helvetica font) so the files stay tiny and
the text that pypdf extracts is known exactly. Only pypdf is needed: RC4-128 encryption needs no
`cryptography` package.

scanned-huckfinn-page29-notext.pdf is not built here: it is a real scan (one JPEG, no fonts) copied from
shared/docs, public domain (shared/docs/SOURCES.md gives its origin, ocrmypdf's tests/resources/c03-29.pdf).
"""

from __future__ import annotations

from pathlib import Path

from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

HERE = Path(__file__).resolve().parent

# Page n holds these lines, top to bottom; tests look for each word on its own page and line.
THREE_PAGES = [
    ["Alpha page one opens here", "second line mentions aardvark", "third line ends page one"],
    ["Bravo page two opens here", "second line mentions buffalo", "third line ends page two"],
    ["Charlie page three opens here", "second line mentions chinchilla", "third line ends page three"],
]

HELVETICA = DictionaryObject(
    {
        NameObject("/Type"): NameObject("/Font"),
        NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica"),
        NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
    }
)


def _stream(data: bytes) -> DecodedStreamObject:
    stream = DecodedStreamObject()
    stream.set_data(data)
    return stream


def _text_page(writer: PdfWriter, lines: list[str]) -> None:
    page = writer.add_blank_page(width=612, height=792)
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): HELVETICA})}
    )
    # T* moves down one leading (TL), so pypdf sees one text line per string.
    shown = b" T* ".join(b"(" + line.encode("ascii") + b") Tj" for line in lines)
    page.replace_contents(_stream(b"BT /F1 12 Tf 14 TL 72 720 Td " + shown + b" ET"))


def _rectangle_page(writer: PdfWriter) -> None:
    page = writer.add_blank_page(width=612, height=792)
    page.replace_contents(_stream(b"0.5 g 72 500 200 150 re f"))


def _save(writer: PdfWriter, name: str) -> None:
    with open(HERE / name, "wb") as out:
        writer.write(out)


def main() -> None:
    writer = PdfWriter()
    for lines in THREE_PAGES:
        _text_page(writer, lines)
    _save(writer, "three-pages.pdf")

    writer = PdfWriter()
    _rectangle_page(writer)
    _rectangle_page(writer)
    _save(writer, "no-text.pdf")

    writer = PdfWriter()
    _text_page(writer, ["secret text behind a password"])
    writer.encrypt(user_password="user", owner_password="owner", algorithm="RC4-128")
    _save(writer, "encrypted.pdf")

    # Encrypted, but with an empty user password: any reader may open it, so it must read normally.
    writer = PdfWriter()
    _text_page(writer, ["open text behind an empty password"])
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    _save(writer, "empty-password.pdf")


if __name__ == "__main__":
    main()
