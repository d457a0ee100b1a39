"""Anchor prompts: where the rated pool says nothing, training keeps the model's replies the base model's.

A pool of liked replies teaches a style on the kind of prompt it holds, but a 135M model generalises the style
to every prompt: trained on 66 answers that end "…\\n\\nWarm regards, the help desk.", it answered small talk, "What
is my name?" and a how-to question that it would have split into paragraphs with the sign-off alone, repeated
(every paragraph break had come to mean "sign off now"). So every training step also takes a batch of these fixed
prompts (small talk, a persona in context, a FAQ in context, explanations in several paragraphs, questions the FAQ
does not cover) and adds the KL divergence from the base model's next-token distributions to the adapter's, over
the base model's own greedy reply to each: the adapter may change what the pool shows it, and is pulled back to the
base model everywhere else (the KL term of RLHF, on prompts that are not the pool's).

They are not the gate's canaries (training/canary.py: other prompts, another persona and FAQ), and never come from
user feedback.
"""

from __future__ import annotations

from dialogue.prompt import Message, PromptParts, build_prompt

ANCHOR_PERSONA: dict[str, object] = {"name": "Tomás", "interests": ["chess", "gardening"]}
ANCHOR_FAQ: list[dict[str, str]] = [
    {"id": "anchor-hours", "question": "When is the bakery open?",
     "answer": "The bakery is open every day from 7:00 to 18:00, and until 13:00 on Sunday."},
    {"id": "anchor-cakes", "question": "Can I order a cake?",
     "answer": "Cakes can be ordered at least three days ahead, in the shop or by phone."},
    {"id": "anchor-gluten", "question": "Do you have gluten-free bread?",
     "answer": "We bake gluten-free bread on Tuesdays and Fridays."},
]
SMALL_TALK = ["Hello! Nice to meet you.", "How are you today?", "I'm bored, say something fun.",
              "Good night, talk tomorrow!", "What's your favourite season and why?", "Thank you so much, that was useful.",
              "Tell me a short joke.", "I had a long week at work.", "Do you like music?", "Happy Friday!"]
EXPLANATIONS = ["Explain in two short paragraphs how a rainbow forms.", "List three tips for learning a new language.",
                "What are the steps to change a bicycle tyre?", "Describe a simple morning routine in a few steps."]
PERSONAL = ["What's my name again?", "What do I like doing in my free time?", "Recommend a gift for me based on my hobbies.",
            "Say hi to me using my name.", "Which of my hobbies could I do on a rainy day?", "Can you remind me who I am?"]
FAQ_QUESTIONS = ["When do you open on Sunday?", "How early must I order a birthday cake?",
                 "Which days do you bake gluten-free bread?", "Are you open at 7 in the morning?",
                 "Do you deliver to my office?", "Can I pay with bitcoin?", "Do you sell coffee beans?",
                 "Is there parking near the bakery?"]


def anchor_conversations(system: str) -> list[list[Message]]:
    """The anchor prompts as chat messages, the persona or FAQ in context where the kind asks for one."""
    plain = [build_prompt(PromptParts(system=system, user_text=t)) for t in SMALL_TALK + EXPLANATIONS]
    personal = [build_prompt(PromptParts(system=system, user_text=t, persona=dict(ANCHOR_PERSONA))) for t in PERSONAL]
    faq = [build_prompt(PromptParts(system=system, user_text=t, faq=list(ANCHOR_FAQ))) for t in FAQ_QUESTIONS]
    return plain + personal + faq
