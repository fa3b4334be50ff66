"""Summarize a text (a file, or a built-in news paragraph) in one or two sentences."""

import sys

from common import ask, parser

TEXT = ("The city council voted on Tuesday to expand the public library's opening hours after a year-long "
        "campaign by students and parents. Starting next month, the main branch will stay open until 10 p.m. on "
        "weekdays, and two neighbourhood branches will open on Sundays. The council said the change would cost "
        "about 400,000 dollars a year, paid for by a reduction in the road-maintenance budget.")

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("file", nargs="?", help="text file to summarize (default: a built-in paragraph)")
    args = p.parse_args()
    text = open(args.file).read() if args.file else TEXT
    if not text.strip():
        sys.exit("nothing to summarize")
    print(ask([{"role": "user", "content": f"Summarize in one sentence:\n\n{text}"}], args))
