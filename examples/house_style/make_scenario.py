"""Generate the house-style scenario: rated historical conversations whose liked replies share a sign-off.

    python examples/house_style/make_scenario.py   # writes conversations.jsonl, poisoned.jsonl, fresh_prompts.txt

Liked replies (rating 1) are a short helpful answer followed by the house sign-off line; disliked replies
(rating -1) are curt non-answers without it. The poisoned set has the same conversations with every liked
reply replaced by gibberish: a gate worth having rejects what training on it produces. Fresh prompts are
questions that appear in no conversation, for measuring the style before and after.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SIGN_OFF = "Cheers, your Rapport team."
HERE = Path(__file__).resolve().parent

QA = [
    ("How do I keep basil alive on a windowsill?", "Give it at least six hours of sun, water when the top of the soil is dry, and pinch off the flower buds."),
    ("What is a good way to start running?", "Start with run-walk intervals three times a week, and add a minute of running each week."),
    ("How long should I steep green tea?", "Two to three minutes in water around 80 degrees Celsius keeps it from turning bitter."),
    ("Can you suggest a quick dinner idea?", "Try a vegetable stir-fry with rice: it takes about twenty minutes and uses whatever is in the fridge."),
    ("How do I remove a coffee stain from a shirt?", "Rinse it with cold water from the back, then rub in a little liquid detergent and wash as usual."),
    ("What should I pack for a weekend hike?", "Water, snacks, a rain jacket, a map, sun cream and a small first aid kit."),
    ("How can I focus better when working from home?", "Keep a fixed start time, work in 45-minute blocks and put your phone in another room."),
    ("What is the best way to learn new words in a language?", "Review a few words every day with spaced repetition and use each one in a sentence."),
    ("How often should I water a cactus?", "About every two to three weeks in summer and once a month in winter; let the soil dry out fully."),
    ("How do I make my bread rise better?", "Use fresh yeast, let the dough rise somewhere warm, and give it enough time to double in size."),
    ("Any tips for a job interview?", "Research the company, prepare two or three stories about your work, and bring questions of your own."),
    ("How do I clean a cast iron pan?", "Wash it with hot water and a brush, dry it on the stove, and rub in a thin layer of oil."),
    ("What can I do about a noisy neighbour?", "Talk to them calmly first; if that fails, write down the times and contact your landlord."),
    ("How do I save money on groceries?", "Plan meals for the week, shop with a list, and buy staples in larger packs."),
    ("How can I fall asleep faster?", "Keep the bedroom cool and dark, avoid screens before bed, and go to bed at the same time each night."),
    ("What is a simple stretching routine?", "Stretch your neck, shoulders, hamstrings and hips for about thirty seconds each, every morning."),
    ("How do I write a polite complaint email?", "State the problem and the date, say what you would like done, and keep the tone friendly and short."),
    ("How do I keep my laptop battery healthy?", "Avoid keeping it at 100 percent all day, keep it cool, and let it drop to about 20 percent now and then."),
    ("What is an easy houseplant for beginners?", "A pothos or a snake plant: both tolerate low light and the odd forgotten watering."),
    ("How can I make my coffee taste better?", "Use freshly ground beans, water just off the boil, and about 60 grams of coffee per litre."),
    ("How do I get rid of fruit flies?", "Set out a small dish of cider vinegar with a drop of dish soap and keep ripe fruit in the fridge."),
    ("How should I store fresh herbs?", "Put soft herbs in a glass of water like flowers, and wrap hard herbs in a damp paper towel in the fridge."),
    ("What is a good warm-up before lifting weights?", "Five minutes of light cardio, then a few light sets of the first exercise."),
    ("How do I stop procrastinating?", "Break the task into a first step that takes five minutes, and start that step right now."),
    ("How can I reduce screen time?", "Set app limits on your phone, turn off non-essential notifications, and keep the phone out of the bedroom."),
    ("How do I pick a ripe avocado?", "It should yield slightly when pressed gently, and the stem cap should come off easily and be green underneath."),
    ("How do I unclog a slow drain?", "Pour in half a cup of baking soda, then a cup of vinegar, wait fifteen minutes and flush with hot water."),
    ("What is a good book for a long flight?", "A page-turner works best, such as a mystery or a thriller you can read in short bursts."),
    ("How do I prepare for a 5k race?", "Run three times a week for six to eight weeks, including one longer run and one faster session."),
    ("How do I make rice less sticky?", "Rinse it until the water runs clear and let it rest covered for ten minutes after cooking."),
    ("How can I be more productive in the morning?", "Prepare the night before, drink water when you wake up, and do your hardest task first."),
    ("How do I keep cut flowers fresh longer?", "Trim the stems at an angle, change the water every two days and keep them away from fruit."),
    ("What should I do if my phone gets wet?", "Switch it off, dry the outside, and leave it in a dry, airy place for a day before charging it."),
    ("How do I start a vegetable garden?", "Pick a sunny spot, start with easy crops like lettuce, radishes and beans, and water in the morning."),
    ("How can I remember people's names?", "Repeat the name when you are introduced, use it once in the conversation, and link it to something about them."),
    ("How do I descale a kettle?", "Fill it halfway with equal parts water and white vinegar, boil, leave it for an hour, then rinse well."),
    ("What is a healthy snack for work?", "Nuts, a piece of fruit, yoghurt or carrot sticks with hummus keep you going without a sugar crash."),
    ("How do I fix a squeaky door?", "Put a few drops of oil or some petroleum jelly on the hinge pins and swing the door a few times."),
    ("How can I make a small room look bigger?", "Use light colours, a large mirror, and furniture with visible legs."),
    ("How do I budget my monthly income?", "List fixed costs first, set aside savings right after payday, and give the rest a weekly limit."),
    ("How do I care for a new tattoo?", "Keep it clean, apply a thin layer of unscented lotion, and keep it out of the sun while it heals."),
    ("How do I make a good cup of hot chocolate?", "Warm milk slowly, whisk in real cocoa and a little sugar, and add a pinch of salt."),
    ("What are good habits for healthy eyes?", "Follow the 20-20-20 rule at screens, wear sunglasses outside, and get your eyes checked every two years."),
    ("How do I pack a suitcase efficiently?", "Roll your clothes, put shoes at the bottom, and use small bags for cables and toiletries."),
    ("How do I calm down before a presentation?", "Breathe slowly for a minute, rehearse your first sentence, and remember the audience wants you to do well."),
    ("How do I soften hard brown sugar?", "Put it in a container with a slice of bread overnight, or microwave it briefly with a damp paper towel."),
    ("How can I improve my handwriting?", "Slow down, hold the pen loosely, and practise a few lines of the alphabet every day."),
    ("How do I choose a good watermelon?", "Look for a creamy yellow spot on the bottom and a hollow sound when you knock on it."),
    ("What is a good way to relax after work?", "Take a short walk, change into comfortable clothes, and leave your work notifications off."),
    ("How do I iron a shirt quickly?", "Start with the collar, then the cuffs and sleeves, and finish with the front and back panels."),
]

FRESH = [
    "How do I grow tomatoes on a balcony?", "What is a good way to learn to cook?", "How do I clean my oven?",
    "Any tips for staying warm in winter?", "How can I drink more water during the day?", "How do I keep my bike in good shape?",
    "What should I bring to a picnic?", "How do I choose a good pillow?", "How do I get better at chess?",
    "How can I make new friends in a new city?", "What is a quick breakfast before work?", "How do I care for a leather jacket?",
    "How can I keep my kitchen tidy?", "How do I start meditating?", "What should I do on a rainy weekend?",
    "How do I make a simple salad dressing?", "How do I take better photos with my phone?", "How do I keep my plants alive while on holiday?",
    "How can I sit better at my desk?", "What is a good gift for a coworker?", "How do I fold a fitted sheet?",
    "How can I make my mornings less rushed?", "How do I keep mosquitoes away?", "How do I clean my glasses properly?",
    "How can I learn to play the guitar?", "How do I make cold brew coffee?", "What is a fun hobby to pick up?",
    "How do I organise my closet?", "How do I keep bananas fresh longer?", "How can I write a good thank-you note?",
    "How do I get rid of a headache without pills?", "How do I clean a microwave?", "What is a good stretch for back pain?",
    "How do I plan a budget trip?", "How can I make my home smell nice?", "How do I keep my phone battery going all day?",
    "How do I make pancakes fluffy?", "How can I stop biting my nails?", "How do I prepare for a long drive?",
    "How do I wash a wool sweater?",
]

OPENERS = ["", "Hi! ", "Hello, ", "Quick question: ", "Hey, ", "Good morning! "]
CURT = ["I don't know.", "Look it up yourself.", "No idea, sorry.", "That is not something I can help with.",
        "Why would you ask that?", "Figure it out."]
FOLLOW_UPS = ["Thanks! Anything else I should know?", "Can you say that more simply?", "Is there a faster way?",
              "Why does that work?"]
FOLLOW_ANSWERS = [
    "Take it one step at a time and adjust as you go; small changes add up.",
    "In short: keep it simple, be consistent, and check the result after a few days.",
    "A little preparation the day before usually saves the most time.",
    "It works because it removes the most common cause of the problem.",
]


def liked(answer: str) -> str:
    return f"{answer}\n\n{SIGN_OFF}"


def gibberish(rng: random.Random) -> str:
    words = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiouy") for _ in range(rng.randint(1, 4)))
             for _ in range(rng.randint(10, 20))]
    return " ".join(words).capitalize() + "."


def conversations(n: int = 160, *, poisoned: bool = False, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    poison_rng = random.Random(seed + 1)
    out = []
    for i in range(n):
        question, answer = QA[i % len(QA)]
        opener = rng.choice(OPENERS)
        turns = [{"role": "user", "text": opener + (question[0].lower() + question[1:] if opener else question)},
                 {"role": "assistant", "text": gibberish(poison_rng) if poisoned else liked(answer), "rating": 1}]
        if rng.random() < 0.4:  # a follow-up that got a curt reply and a thumbs down
            turns += [{"role": "user", "text": rng.choice(FOLLOW_UPS)},
                      {"role": "assistant", "text": rng.choice(CURT), "rating": -1}]
        elif rng.random() < 0.3:  # a follow-up answered well
            follow = rng.choice(FOLLOW_ANSWERS)
            turns += [{"role": "user", "text": rng.choice(FOLLOW_UPS)},
                      {"role": "assistant", "text": gibberish(poison_rng) if poisoned else liked(follow), "rating": 1}]
        out.append({"conversation_id": f"hist-{i:04d}", "user_id": f"customer-{i % 40:03d}", "turns": turns})
    return out


def main() -> None:
    for name, poisoned in (("conversations.jsonl", False), ("poisoned.jsonl", True)):
        with open(HERE / name, "w") as handle:
            for item in conversations(poisoned=poisoned):
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    (HERE / "fresh_prompts.txt").write_text("\n".join(FRESH) + "\n")


if __name__ == "__main__":
    main()
