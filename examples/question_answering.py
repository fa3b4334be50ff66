"""Answer a question about a given passage."""

from common import ask, parser

PASSAGE = ("The Great Wall of China is a series of fortifications built across the historical northern borders "
           "of ancient Chinese states. Its best-known sections were built by the Ming dynasty (1368–1644).")

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--passage", default=PASSAGE)
    p.add_argument("--question", default="Which dynasty built the best-known sections of the wall?")
    args = p.parse_args()
    print(ask([{"role": "system", "content": "Answer using only the passage."},
               {"role": "user", "content": f"Passage: {args.passage}\n\nQuestion: {args.question}"}], args))
