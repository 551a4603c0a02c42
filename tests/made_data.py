"""Small datasets the tests make for themselves, in the layouts the real ones come in: stories as plain
text (TinyStories), Alpaca's instruction records, OpenAssistant's message trees. Made from a seed, so
a clone needs nothing beside it but GPT-2's tokenizer files. The text is simple and regular on
purpose: a tiny model learns it within a few dozen steps, which is what the training tests check."""
import json
import random

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sam", "Anna", "Max", "Zoe", "Leo", "Emma"]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "duck", "frog", "bear"]
PLACES = ["park", "garden", "forest", "house", "river", "hill", "school", "beach"]
THINGS = ["ball", "kite", "box", "hat", "book", "cake", "boat", "flower"]
COLORS = ["red", "blue", "green", "yellow", "big", "little", "shiny", "soft"]
FEELINGS = ["happy", "sad", "scared", "proud", "tired", "excited"]
VERBS = ["play", "run", "jump", "sing", "dance", "read", "swim", "draw"]


def story(rng):
    """A few sentences in TinyStories' manner: one child, one friend, one thing lost and found."""
    name, friend, animal = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ANIMALS)
    place, thing, color = rng.choice(PLACES), rng.choice(THINGS), rng.choice(COLORS)
    feeling, verb = rng.choice(FEELINGS), rng.choice(VERBS)
    sentences = [
        f"Once upon a time, there was a little {animal} named {name}.",
        f"{name} liked to {verb} in the {place} every day.",
        f"One day, {name} found a {color} {thing} near the {place}.",
        f"{name} felt {feeling} and showed the {thing} to {friend}.",
        f'"Can we {verb} with it?" asked {friend}.',
        f'"Yes, let us {verb} together," said {name}.',
        f"They played with the {color} {thing} until the sun went down.",
        f"From that day on, {name} and {friend} were best friends.",
    ]
    cut = rng.randint(5, len(sentences))
    return " ".join(sentences[:cut - 1] + sentences[-1:])


def stories(n, seed=0):
    """n stories, one per paragraph, separated by blank lines as TinyStories' text files are."""
    rng = random.Random(seed)
    return "\n\n".join(story(rng) for _ in range(n)) + "\n"


def instruction(rng):
    """One Alpaca record ({instruction, input, output}), the input empty for about half of them."""
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    thing, color, name = rng.choice(THINGS), rng.choice(COLORS), rng.choice(NAMES)
    kind = rng.randrange(5)
    if kind == 0:
        return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 2:
        return {"instruction": "Describe the object in one sentence.", "input": f"a {color} {thing}",
                "output": f"It is a {color} {thing}."}
    if kind == 3:
        return {"instruction": f"Write a short greeting for {name}.", "input": "",
                "output": f"Hello, {name}! It is nice to see you today."}
    animal = rng.choice(ANIMALS)
    return {"instruction": "Name the animal in the sentence.", "input": f"The {animal} ran to the {rng.choice(PLACES)}.",
            "output": f"The animal is the {animal}."}


def instructions(n, seed=0):
    rng = random.Random(seed)
    return [instruction(rng) for _ in range(n)]


def message(rng, role, depth, max_depth):
    """An OpenAssistant message with its replies: 1 to 3 ranked replies (an occasional deleted one), a
    depth of up to `max_depth` messages, and sometimes a question nobody answered at the end."""
    if role == "prompter":
        text = rng.choice(["Can you tell me a story?", f"What can I do in the {rng.choice(PLACES)}?",
                           f"Why do {rng.choice(ANIMALS)}s like to {rng.choice(VERBS)}?", "And then what?"])
    else:
        text = story(rng)
    node = {"message_id": f"m{rng.randrange(10**9)}", "text": text, "role": role, "lang": "en", "deleted": False,
            "replies": []}
    if depth + 1 < max_depth:
        other = "assistant" if role == "prompter" else "prompter"
        replies = [message(rng, other, depth + 1, max_depth) for _ in range(rng.randint(1, 3 if depth < 2 else 1))]
        for rank, reply in enumerate(replies):
            reply["rank"] = rank
        if len(replies) > 1 and rng.random() < 0.3:
            replies[0]["deleted"] = True  # (never followed)
        node["replies"] = replies
    return node


def oasst_trees(n, seed=0):
    """n message trees as OpenAssistant's tree exports hold them; about a third have 4 or more turns on
    their best path, and some end in a question with no answer."""
    rng = random.Random(seed)
    return [{"message_tree_id": f"t{i}", "tree_state": "ready_for_export",
             "prompt": message(rng, "prompter", 0, rng.choice([2, 2, 3, 4, 5]))} for i in range(n)]


def write_all(directory):
    """The three datasets as files in `directory`: stories.txt, instructions.json, oasst_trees.jsonl."""
    (directory / "stories.txt").write_text(stories(600))
    (directory / "instructions.json").write_text(json.dumps(instructions(1100), indent=1))
    (directory / "oasst_trees.jsonl").write_text("".join(json.dumps(t) + "\n" for t in oasst_trees(100)))
    return directory
