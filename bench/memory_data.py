"""Synthetic long conversations for the memory benchmark: facts said weeks before a paraphrased question.

Each conversation is one user talking over many sessions: a few hundred turns of chit-chat, requests and
hard distractors (other people's dogs, cities and jobs, in the same words), with facts about the user
scattered through it; the assistant's replies are in it too, some of them wrong about the user (a small
model's inventions), and must never be retrieved. Questions are asked at the end, phrased differently from
the statements; each lists the indices of its evidence turns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

NAMES = ["Lena", "Marta", "Tomas", "Ines", "Rafael", "Yuki", "Omar", "Priya", "Jonas", "Sofia", "Carlos",
         "Amara", "Noah", "Elif", "Mateo", "Hana", "Ivan", "Zara", "Felix", "Nadia"]
PETS = ["Biscuit", "Pepper", "Rex", "Luna", "Mochi", "Bruno", "Nala", "Ziggy", "Olive", "Toby"]
CITIES = ["Porto", "Lyon", "Leipzig", "Valencia", "Krakow", "Utrecht", "Bologna", "Gothenburg", "Tallinn", "Bilbao"]
JOBS = ["paediatric nurse", "civil engineer", "primary school teacher", "data analyst", "pastry chef",
        "architect", "physiotherapist", "bus driver", "graphic designer", "pharmacist"]
FOODS = ["peanuts", "shellfish", "gluten", "strawberries", "sesame", "lactose"]
DISHES = ["mushroom risotto", "pad thai", "lasagne", "ramen", "paella", "falafel wraps"]
CARS = ["red Fiat Panda", "second-hand Volvo estate", "Toyota Yaris hybrid", "small Renault Clio", "blue VW Golf"]
HOBBIES = ["bouldering", "birdwatching", "pottery", "trail running", "salsa dancing", "chess in the park"]
INSTRUMENTS = ["cello", "ukulele", "piano", "saxophone", "violin", "drums"]
LANGUAGES = ["Japanese", "Portuguese", "Finnish", "Korean", "Italian", "Arabic"]
TEAMS = ["Benfica", "Celtic", "Ajax", "Sevilla", "Borussia Dortmund", "Napoli"]
COMPANIES = ["Nordlicht Logistics", "Bluefin Analytics", "Casa Verde Bakery", "Helix Medical", "Orbit Games"]
SUBJECTS = ["marine biology", "medieval history", "mechanical engineering", "philosophy", "economics"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
INJURIES = ["wrist", "ankle", "collarbone", "left knee"]
BOOKS = ["Dune", "Middlemarch", "The Left Hand of Darkness", "One Hundred Years of Solitude", "Piranesi"]

# kind: (values, statements, questions, distractors); {x} the user's value, {y} another value, {n} a name
FACTS: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "pet": (PETS, [
        "{x} knocked the bin over again, so I took the naughty boy for a long walk.",
        "We finally adopted a dog last weekend, we named him {x}.",
        "My dog {x} chewed my shoes again."],
            ["What is the name of my pet?", "What did we call the puppy we adopted?"],
            ["My neighbour's dog {y} barks all night.", "{n} just got a dog called {y}."]),
    "city": (CITIES, [
        "The tram here in {x} was late again this morning.",
        "I moved to {x} in the spring and I love the old town.",
        "Living in {x} has been great so far."],
             ["Which city do I live in?", "Where is my home these days?"],
             ["{n} is thinking about moving to {y}.", "I read an article about housing prices in {y}."]),
    "job": (JOBS, [
        "Another night shift as a {x}, I need a holiday.",
        "I work as a {x}, the shifts can be long.",
        "Being a {x} is tiring but I like it."],
            ["What do I do for a living?", "What is my profession?"],
            ["My cousin {n} trained as a {y}.", "Do you think a {y} earns well?"]),
    "sister": (NAMES, [
        "{x} and I grew up sharing a bedroom, she still steals my clothes.",
        "My sister {x} is coming to stay with us next month.",
        "I called my sister {x} yesterday."],
               ["What is my sister called?", "Who is my sibling?"],
               ["My friend {y}'s sister is getting married.", "{y} from work has three brothers."]),
    "allergy": (FOODS, [
        "Had to use my EpiPen once after eating {x} by accident.",
        "I'm allergic to {x}, so I always check labels.",
        "I can't eat {x}, I react badly to it."],
                ["Is there any food I must avoid?", "What am I allergic to?"],
                ["{n} told me {y} are very healthy.", "Is {y} used a lot in Thai cooking?"]),
    "dish": (DISHES, [
        "Made {x} again tonight, third time this week.",
        "My favourite thing to cook is {x}.",
        "Nothing beats a plate of {x} on a Friday night."],
             ["Which meal do I enjoy the most?", "What's my favourite dish?"],
             ["{n} cooked {y} for the team lunch.", "Can you give me a recipe for {y}?"]),
    "car": (CARS, [
        "The {x} wouldn't start this morning, had to call roadside assistance.",
        "I drive a {x} to work every day.",
        "My {x} needs new tyres."],
            ["What vehicle do I own?", "What kind of car do I have?"],
            ["My boss just bought a {y}.", "Is a {y} good on fuel?"]),
    "hobby": (HOBBIES, [
        "Sore all over after {x} on Saturday.",
        "On weekends I usually go {x} with friends.",
        "I've really got into {x} lately."],
              ["What do I like doing in my free time?", "What is my hobby?"],
              ["{n} wants to try {y} one day.", "I saw a documentary about {y}."]),
    "partner": (NAMES, [
        "{x} surprised me with breakfast in bed for our anniversary.",
        "My wife {x} and I celebrated our anniversary.",
        "{x}, my husband, is a great cook."],
                ["What is my spouse's name?", "Who am I married to?"],
                ["{y} and her husband are moving away.", "My colleague {y} is getting divorced."]),
    "birthday": (MONTHS, [
        "Every {x} my family throws me a surprise party, it's my special day.",
        "My birthday is in {x}, I'll be turning forty.",
        "I was born in {x}."],
                 ["When is my birthday?", "In which month was I born?"],
                 ["{n}'s birthday party is in {y}.", "The conference is in {y} this year."]),
    "trip": (CITIES, [
        "Just packed the suitcase for {x}, leaving in two weeks.",
        "I booked flights to {x} for the summer holidays.",
        "We're going to {x} on holiday in August."],
             ["Where am I travelling this summer?", "What is my holiday destination?"],
             ["{n} went to {y} last year and hated it.", "Are flights to {y} expensive?"]),
    "instrument": (INSTRUMENTS, [
        "My teacher says my {x} scales are finally improving.",
        "I've been taking {x} lessons for two years.",
        "I practise the {x} every evening."],
                   ["Which musical instrument do I play?", "What am I learning to play?"],
                   ["My nephew plays the {y} in a band.", "Is the {y} hard to learn?"]),
    "language": (LANGUAGES, [
        "Did my {x} flashcards on the bus again.",
        "I'm studying {x} for an exam in autumn.",
        "I try to practise {x} every morning."],
                 ["Which foreign language am I learning?", "What language am I studying?"],
                 ["{n} speaks fluent {y}.", "How many people speak {y}?"]),
    "team": (TEAMS, [
        "Got tickets for the {x} derby, can't wait!",
        "I've supported {x} since I was a kid.",
        "Did you see {x} won on Saturday? Best team."],
             ["Which football club am I a fan of?", "What team do I support?"],
             ["My brother-in-law is a {y} fan.", "Who is the coach of {y}?"]),
    "employer": (COMPANIES, [
        "My manager at {x} wants the report by Friday.",
        "I started a new job at {x} in March.",
        "Things at {x} are busy this quarter."],
                 ["Which company do I work for?", "Who is my employer?"],
                 ["{n} applied to {y}.", "I saw an advert for {y} on the train."]),
    "degree": (SUBJECTS, [
        "Still have all my old {x} textbooks from my student days.",
        "I studied {x} at university.",
        "My degree was in {x}, long time ago."],
               ["What did I study?", "What is my degree in?"],
               ["{n} is doing a master's in {y}.", "Is {y} a good subject to study?"]),
    "injury": (INJURIES, [
        "The cast on my {x} comes off next week.",
        "I broke my {x} skiing in February.",
        "My {x} still hurts after the fall."],
               ["What injury did I have?", "Which part of my body did I hurt?"],
               ["{n} sprained her {y} playing tennis.", "How long does a broken {y} take to heal?"]),
    "book": (BOOKS, [
        "Finished {x} for the fourth time, I cried again.",
        "I'm rereading {x}, it's my favourite novel.",
        "{x} is the best book I've ever read."],
             ["What is my favourite book?", "Which novel do I love?"],
             ["{n} recommended {y} to me, not sure.", "Is {y} worth reading?"]),
}
# questions that name the user's value and ask about its context (LoCoMo-style "when did I adopt Biscuit?")
ENTITY_QUESTIONS: dict[str, list[str]] = {
    "pet": ["What kind of animal is {x}?", "What has {x} been up to?"],
    "city": ["How do I feel about living in {x}?", "When did I settle in {x}?"],
    "job": ["Do I enjoy being a {x}?", "What's hard about my {x} work?"],
    "sister": ["What is {x}'s relation to me?", "What did I say about {x}?"],
    "allergy": ["Why do I stay away from {x}?", "What happens if I eat {x}?"],
    "dish": ["How do I feel about {x}?", "When do I like to have {x}?"],
    "car": ["What do I use the {x} for?", "Is anything wrong with my {x}?"],
    "hobby": ["Who do I go {x} with?", "How often do I do {x}?"],
    "partner": ["Who is {x} to me?", "What did {x} and I celebrate?"],
    "birthday": ["What happens for me in {x}?", "Why is {x} special for me?"],
    "trip": ["When am I going to {x}?", "What are my plans for {x}?"],
    "instrument": ["How long have I played the {x}?", "How often do I practise the {x}?"],
    "language": ["Why am I learning {x}?", "How do I practise {x}?"],
    "team": ["Since when have I followed {x}?", "How did {x} do at the weekend?"],
    "employer": ["When did I join {x}?", "How are things at {x}?"],
    "degree": ["Where did I study {x}?", "Did I go to university for {x}?"],
    "injury": ["How did I hurt my {x}?", "Is my {x} better now?"],
    "book": ["What do I think of {x}?", "Have I read {x}?"],
}
FILLER = [
    "Can you help me write an email to my landlord about the heating?", "What's a good way to stay focused?",
    "How long should I boil an egg?", "I had such a long day today.", "Any tips for sleeping better?",
    "Remind me what the capital of Australia is.", "Can you summarise the news for me?",
    "What's the difference between baking soda and baking powder?", "I'm bored, tell me a fun fact.",
    "How do I convert Celsius to Fahrenheit?", "Give me three ideas for a rainy Sunday.", "Thanks, that helps!",
    "What should I get {n} for her birthday?", "Can you explain compound interest simply?",
    "I need to plan my week, where do I start?", "What's a polite way to decline a meeting?",
    "How many steps a day is healthy?", "Can you suggest a podcast about history?", "Good morning!",
    "I'm meeting {n} for coffee later.", "What's the weather usually like in spring?", "ok, bye for now",
]
REPLIES = ["Sure, here is a suggestion.", "That sounds lovely!", "Happy to help with that.",
           "Good question. Let me explain.", "I understand, that can be hard."]
WRONG = ["You mentioned your dog is called {y}, right?", "As someone who lives in {y}, you might enjoy this.",
         "Since you work as a {y}, you must be busy.", "Your sister {y} would love that."]


@dataclass
class Question:
    text: str
    evidence: list[int]  # indices into Conversation.turns
    kind: str  # "value": asks for the fact in other words; "entity": names it and asks about its context


@dataclass
class Conversation:
    user_id: str
    turns: list[dict] = field(default_factory=list)  # {"text", "speaker", "timestamp", "meta": {"turn": i}}
    questions: list[Question] = field(default_factory=list)


def generate(n_conversations: int = 4, user_turns: int = 300, seed: int = 7) -> list[Conversation]:
    """`n_conversations` users, each with `user_turns` turns of their own over ~12 weeks of sessions."""
    rng = random.Random(seed)
    conversations = []
    for c in range(n_conversations):
        convo = Conversation(user_id=f"bench:user{c}")
        facts = {kind: rng.choice(values) for kind, (values, *_rest) in FACTS.items()}
        # where each fact is said: spread over the first 80% of the conversation, so weeks before the questions
        slots = rng.sample(range(int(user_turns * 0.8)), len(facts))
        fact_at = dict(zip(slots, facts))
        clock = datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc)
        for i in range(user_turns):
            clock += timedelta(minutes=rng.randint(1, 6)) if rng.random() < 0.93 else timedelta(days=rng.randint(2, 6))
            name = rng.choice(NAMES)
            if i in fact_at:
                kind = fact_at[i]
                values, statements, questions, _ = FACTS[kind]
                text = rng.choice(statements).format(x=facts[kind], n=name)
                convo.questions.append(Question(rng.choice(questions), [len(convo.turns)], "value"))
                convo.questions.append(Question(rng.choice(ENTITY_QUESTIONS[kind]).format(x=facts[kind]),
                                                [len(convo.turns)], "entity"))
            elif rng.random() < 0.45:
                kind = rng.choice(list(FACTS))
                values, _, _, distractors = FACTS[kind]
                other = rng.choice([v for v in values if v != facts[kind]])
                text = rng.choice(distractors).format(y=other, n=name)
            else:
                text = rng.choice(FILLER).format(n=name)
            convo.turns.append({"text": text, "speaker": "user", "timestamp": clock.isoformat(),
                                "meta": {"turn": len(convo.turns)}})
            if rng.random() < 0.08:  # the assistant inventing facts about the user
                kind = rng.choice(["pet", "city", "job", "sister"])
                other = rng.choice([v for v in FACTS[kind][0] if v != facts[kind]])
                reply = rng.choice(WRONG).format(y=other)
            else:
                reply = rng.choice(REPLIES)
            convo.turns.append({"text": reply, "speaker": "assistant", "timestamp": clock.isoformat(),
                                "meta": {"turn": len(convo.turns)}})
        conversations.append(convo)
    return conversations
