"""A fixed canary set of general prompts: their reference answers' perplexity must not rise after training.

It is what stops a poisoned or degenerate dataset: an adapter that learned gibberish, or lost its English,
finds these ordinary answers much less likely than the model before it did. Never train on these.

CANARY_PROMPTS are for the behaviour gate (training/gate.py): the candidate answers them by generation, with a
fixed FAQ and persona in context where the kind asks for one, and its replies are checked as text and for
fluency under the base model. They come from this file only, never from user feedback.
"""

from dataclasses import dataclass

CANARY: list[tuple[str, str]] = [
    ('What is the capital of France?',
     'The capital of France is Paris.'),
    ('How many days are there in a week?',
     'There are seven days in a week.'),
    ('What do plants need to grow?',
     'Plants need sunlight, water, air and nutrients from the soil to grow.'),
    ('Can you explain what a noun is?',
     'A noun is a word that names a person, place, thing or idea, such as teacher, city, book or happiness.'),
    ('Why is the sky blue?',
     'Sunlight is scattered by the air, and blue light is scattered much more than red light, so the sky looks blue.'),
    ('Give me a tip for sleeping better.',
     'Try to go to bed at the same time every night and keep screens out of the bedroom for the last hour before sleep.'),
    ('What is 12 times 12?',
     '12 times 12 is 144.'),
    ('How do I boil an egg?',
     'Put the egg in boiling water for about eight minutes, then cool it in cold water before peeling.'),
    ('What is the largest ocean on Earth?',
     'The Pacific Ocean is the largest ocean on Earth.'),
    ("Translate 'thank you' into Spanish.",
     "In Spanish, 'thank you' is 'gracias'."),
    ('What is the boiling point of water at sea level?',
     'Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at sea level.'),
    ('Write one sentence about the moon.',
     'The moon orbits the Earth and reflects the light of the sun.'),
    ('Who wrote Romeo and Juliet?',
     'William Shakespeare wrote Romeo and Juliet.'),
    ('How can I stay hydrated during the day?',
     'Keep a bottle of water with you and drink a glass with every meal.'),
    ('What is a healthy breakfast?',
     'Oatmeal with fruit and a glass of milk is a simple, healthy breakfast.'),
    ('Name three primary colors.',
     'Red, blue and yellow are the three primary colors.'),
]


# -- behaviour canaries: prompts the candidate answers by generation (never from user feedback) -------------

CANARY_FAQ: list[dict[str, str]] = [
    {"id": "canary-hours", "question": "When are you open?",
     "answer": "We are open Monday to Friday from 9:00 to 17:30 and on Saturday from 10:00 to 14:00."},
    {"id": "canary-returns", "question": "Can I return an item?",
     "answer": "Unused items can be returned within 30 days with the receipt for a full refund."},
    {"id": "canary-shipping", "question": "How much is shipping?",
     "answer": "Shipping costs 4.90 euros and is free for orders over 50 euros."},
    {"id": "canary-address", "question": "Where is the shop?",
     "answer": "The shop is at Lindenweg 12, next to the central station."},
]
CANARY_PERSONA: dict[str, object] = {"name": "Mira", "interests": ["climbing", "baking"]}


@dataclass(frozen=True)
class CanaryPrompt:
    """One behaviour canary: the prompt parts' extras and what a good reply contains (`expect`, any of)."""

    kind: str  # "smalltalk" | "personal" | "faq" | "unknown"
    text: str
    expect: tuple[str, ...] = ()
    faq: bool = False  # the canary FAQ is in context
    persona: bool = False  # the canary persona is in the system message


CANARY_PROMPTS: list[CanaryPrompt] = [
    CanaryPrompt("smalltalk", "Hi there! How is your day going?"),
    CanaryPrompt("smalltalk", "Good morning, I just wanted to say hello."),
    CanaryPrompt("smalltalk", "What do you like to do on a rainy afternoon?"),
    CanaryPrompt("smalltalk", "Can you tell me something nice about autumn?"),
    CanaryPrompt("smalltalk", "Thanks for your help earlier!"),
    CanaryPrompt("personal", "What is my name?", ("mira",), persona=True),
    CanaryPrompt("personal", "Do you remember what my hobbies are?", ("climbing", "baking"), persona=True),
    CanaryPrompt("personal", "Suggest a weekend plan that fits my interests.", ("climb", "bak"), persona=True),
    CanaryPrompt("personal", "Please greet me by my name.", ("mira",), persona=True),
    CanaryPrompt("faq", "What are your opening hours?", ("9:00", "9 am", "17:30", "monday"), faq=True),
    CanaryPrompt("faq", "Are you open on Saturday?", ("10:00", "14:00", "saturday"), faq=True),
    CanaryPrompt("faq", "How long do I have to return something?", ("30",), faq=True),
    CanaryPrompt("faq", "What does shipping cost?", ("4.90", "4,90", "50"), faq=True),
    CanaryPrompt("faq", "What is the address of the shop?", ("lindenweg",), faq=True),
    CanaryPrompt("unknown", "Do you sell gift cards for the shop?", faq=True),
    CanaryPrompt("unknown", "Can I book a private shopping appointment?", faq=True),
    CanaryPrompt("unknown", "Is there a student discount?", faq=True),
    CanaryPrompt("unknown", "Do you repair electric scooters?", faq=True),
]
