"""A chat bot that remembers the conversation: each turn sends the whole history."""

import sys

from common import ask, parser

if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    history = [{"role": "system", "content": "You are a friendly, concise assistant."}]
    for line in sys.stdin:
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        answer = ask(history, args, temperature=0.0)
        history.append({"role": "assistant", "content": answer})
        print(f"> {line.strip()}\n{answer}\n", flush=True)
    print(f"({(len(history) - 1) // 2} turns)")
