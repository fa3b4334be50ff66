"""Translate between English and Chinese (direction guessed from the text)."""

from common import ask, parser

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("text", nargs="?", default="I like drinking tea in the morning.")
    args = p.parse_args()
    to = "English" if any("\u4e00" <= ch <= "\u9fff" for ch in args.text) else "Chinese"
    print(ask([{"role": "user", "content": f"Translate into {to}. Reply with the translation only.\n\n{args.text}"}],
              args))
