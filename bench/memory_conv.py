"""Long two-person conversations for the memory benchmark, LoCoMo-like: harder than `bench.memory_data`.

Two named friends talk over months of dated sessions. Most turns are small talk; facts about each of them come
up now and then, told with time references ("last week", "in March"), and the two have facts of the same kinds
(both have a pet, a city, a job), so the other speaker's fact is always a close distractor. Some facts change
(one moves city, changes job): the newest statement is the answer. Questions name the speaker and use other words
than the evidence ("What does Melanie do for work?" for "I started as a paramedic last month"). Every question
lists the ids of its evidence turns; a retriever finds a question when any evidence turn is in its top k.

Everything comes from a seed. Two splits: "tune" (the one a search change may be judged on) and "heldout", with
other names, other values, and question wordings that "tune" never uses, for checking that a change generalises.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

SPLITS = {
    "tune": {"seed": 11, "names": ["Caroline", "Melanie", "Jon", "Gina", "Joanna", "Nate", "Audrey", "Andrew",
                                   "Evan", "Deborah", "Calvin", "Maria"]},
    "heldout": {"seed": 97, "names": ["Priya", "Tobias", "Hannah", "Marcus", "Leila", "Oscar", "Ruth", "Dmitri",
                                      "Beatriz", "Kwame", "Ingrid", "Samuel"]},
}

# kind → values (tune half / heldout half), statements ({x} value, {when} time reference, {o} the other speaker),
# questions per split ({s} the speaker, {x} the value for questions that name it). Values differ between splits.
STATIC = {
    "pet": (["Rex", "Biscuit", "Pepper", "Luna", "Mochi", "Bruno"], ["Ziggy", "Olive", "Toby", "Nala", "Pickle", "Juno"], [
        "We adopted a puppy {when}, we named him {x}!",
        "Sorry I was quiet, our dog {x} ate one of my socks {when} and we spent the night at the vet.",
        "{x} has been such a good boy since we brought him home {when}."],
        {"tune": ["What is the name of {s}'s dog?", "What did {s} call the new pet?"],
         "heldout": ["What's {s}'s pup called?", "Which name did {s} give the animal they adopted?"]}),
    "job": (["paramedic", "pastry chef", "civil engineer", "pharmacist"], ["architect", "bus driver", "dental hygienist", "librarian"], [
        "I started working as a {x} {when}, the shifts are long but I love it.",
        "Work as a {x} was crazy {when}, I barely slept.",
        "Being a {x} was my dream since school, and I finally got there {when}."],
        {"tune": ["What does {s} do for a living?", "What is {s}'s profession?"],
         "heldout": ["What is {s}'s occupation?", "Which career does {s} have?"]}),
    "sibling": (["Theo", "Clara", "Rosa", "Felix"], ["Ada", "Hugo", "Mila", "Otto"], [
        "My brother {x} came to visit {when}, we stayed up all night talking.",
        "{x}, my little brother, just got engaged {when}!",
        "I took my brother {x} to the airport {when}, I miss him already."],
        {"tune": ["Who is {s}'s brother?", "What is the name of {s}'s sibling?"],
         "heldout": ["What's {s}'s brother called?", "Which family member of {s} got engaged?"]}),
    "instrument": (["cello", "ukulele", "saxophone"], ["violin", "trumpet", "harp"], [
        "I finally played a whole song on the {x} {when} without a mistake.",
        "My {x} teacher said {when} that my scales are getting better.",
        "Been practising the {x} every evening since {when}."],
        {"tune": ["Which instrument is {s} learning?", "What musical instrument does {s} play?"],
         "heldout": ["What does {s} practise playing in the evenings?", "Which instrument has {s} been taking lessons on?"]}),
    "hobby": (["bouldering", "pottery", "birdwatching"], ["kayaking", "woodworking", "astronomy"], [
        "I went {x} for the first time {when} and I'm hooked.",
        "My arms are so sore from {x} {when}.",
        "Joined a {x} club {when}, the people there are lovely."],
        {"tune": ["What new pastime did {s} pick up?", "What does {s} do in their free time?"],
         "heldout": ["Which leisure activity is {s} into?", "What did {s} try for the first time and get hooked on?"]}),
    "allergy": (["peanuts", "shellfish", "sesame"], ["gluten", "kiwi", "walnuts"], [
        "I had a bad reaction to {x} at a restaurant {when}, I had to use my EpiPen.",
        "Turns out I'm allergic to {x}, the doctor told me {when}.",
        "Can't touch {x} anymore, found out {when} the hard way."],
        {"tune": ["What is {s} allergic to?", "Which food must {s} avoid?"],
         "heldout": ["What food makes {s} ill?", "What can {s} not eat?"]}),
    "book": (["Dune", "Middlemarch", "Piranesi"], ["Beloved", "Persuasion", "Solaris"], [
        "I finished {x} {when}, I cried at the ending.",
        "Started rereading {x} {when}, it's still my favourite novel.",
        "{x} is the best thing I've read, I gave a copy to my mum {when}."],
        {"tune": ["What is {s}'s favourite book?", "Which novel does {s} love?"],
         "heldout": ["Which story moved {s} to tears?", "What book does {s} keep rereading?"]}),
    "car": (["red Fiat Panda", "old Volvo estate", "blue VW Golf"], ["green Mini", "white Skoda", "grey Toyota Yaris"], [
        "The {x} broke down on the motorway {when}, I waited two hours for the tow truck.",
        "We bought a {x} {when}, finally no more buses!",
        "Took the {x} to the mechanic {when}, new brakes."],
        {"tune": ["What car does {s} drive?", "What vehicle does {s} own?"],
         "heldout": ["What does {s} drive to work?", "Which automobile did {s} get?"]}),
}
# facts that change: said first with one value, later with another; "now" questions want the newest statement
CHANGING = {
    "city": (["Lyon", "Porto", "Leipzig", "Valencia", "Krakow"], ["Utrecht", "Bologna", "Tallinn", "Bilbao", "Graz"], [
        "We just moved to {x} {when}, the flat is full of boxes.",
        "Moving to {x} {when} was the best decision, the old town is beautiful.",
        "Still getting used to life in {x} since we settled here {when}."],
        "I've lived in {x} my whole life, I can't imagine leaving.",
        {"tune": ["Where does {s} live now?", "Which city is {s}'s home these days?"],
         "heldout": ["What town is {s} currently based in?", "Where is {s} living at the moment?"]}),
    "employer": (["Helix Medical", "Orbit Games", "Nordlicht Logistics", "Casa Verde"], ["Bluefin Analytics", "Atlas Print", "Greenway Foods", "Kestrel Air"], [
        "I quit and joined {x} {when}, new desk, new people.",
        "First month at {x} done, I started there {when}.",
        "Signed the contract with {x} {when}, I start on Monday."],
        "I've been at {x} for six years now, same desk, same coffee.",
        {"tune": ["Which company does {s} work for now?", "Who is {s}'s current employer?"],
         "heldout": ["Where is {s} employed at present?", "Which firm has {s} recently joined?"]}),
}
# one-off events: (what the speaker says they did, how a question names it per split)
EVENTS = [
    ("ran a charity 5k", {"tune": "take part in the charity race", "heldout": "do the fundraising run"}),
    ("went to a pottery workshop", {"tune": "attend the ceramics class", "heldout": "make clay pots at a class"}),
    ("got a promotion at work", {"tune": "get promoted", "heldout": "move up at their job"}),
    ("visited my grandma in hospital", {"tune": "see their grandmother who was ill", "heldout": "go to the hospital to see a grandparent"}),
    ("painted the living room yellow", {"tune": "redecorate the lounge", "heldout": "change the colour of the sitting room walls"}),
    ("went camping by the lake", {"tune": "sleep in a tent near the water", "heldout": "go on the lakeside camping trip"}),
    ("signed up for salsa lessons", {"tune": "start dance classes", "heldout": "enrol in a Latin dance course"}),
    ("volunteered at the food bank", {"tune": "help out at the charity giving out groceries", "heldout": "do volunteer work with food donations"}),
    ("baked a three-layer cake for my niece", {"tune": "make a birthday cake for a relative", "heldout": "bake for their niece"}),
    ("had my wisdom teeth out", {"tune": "have dental surgery", "heldout": "go through the tooth extraction"}),
    ("gave a talk at a conference", {"tune": "speak in front of an audience at an event", "heldout": "present at the conference"}),
    ("planted tomatoes on the balcony", {"tune": "start growing vegetables", "heldout": "do some balcony gardening"}),
    ("went to a Coldplay concert", {"tune": "see the band play live", "heldout": "attend the gig"}),
    ("took my first surfing lesson", {"tune": "try riding waves", "heldout": "learn to surf"}),
    ("adopted a kitten from the shelter", {"tune": "bring home a cat from the rescue centre", "heldout": "get a new kitten"}),
    ("finished my first marathon", {"tune": "complete the 42 km race", "heldout": "run the full marathon"}),
]
EVENT_SAY = ["Guess what, I {e} {when}!", "I {e} {when}, it was amazing.", "So {when} I {e}. Still buzzing.",
             "Not sure if I told you, {o}, but I {e} {when}."]
EVENT_ASK = {"tune": ["When did {s} {q}?", "What did {s} say about when they would {q}?"],
             "heldout": ["At what time did {s} {q}?", "How long ago did {s} {q}?"]}
GREETINGS = ["Hey {o}! Long time no see, how have you been?", "Hi {o}, so good to hear from you!",
             "Hey! Long time no see, how are things?", "Hi! Sorry for the radio silence.", "Heya, how's your week going?"]
SMALL_TALK = [
    "Haha, that's awesome!",
    "Wow, that sounds amazing.", "I'm so happy for you!", "Thanks! Talk soon.", "What have you been up to lately?",
    "Same old, work and more work.", "The weather has been crazy here this week.", "I totally agree with you.",
    "Take care of yourself!", "That's so sweet of you to say.", "Oh no, I'm sorry to hear that.",
    "lol yes, exactly", "I know right?", "That reminds me, I need to call my mum.", "How was your weekend?",
    "Pretty quiet weekend, I mostly slept.", "You always make me laugh.", "Sounds like a plan!",
    "I can't believe it's already {month}.", "Anyway, I should get going, dinner is almost ready.",
    "Did you watch the match last night?", "Not really, I was too tired.", "Let's catch up again soon!",
    "Good luck, you've got this!", "That must have been stressful.", "Aww, I love that.", "Me too, honestly.",
    "Have you tried that new cafe near the station?", "I'm thinking of getting a haircut, any ideas?",
    "Time flies, doesn't it?", "Honestly I just need a holiday.", "Ha, tell me about it.",
]
# lines that share words with the facts without stating one (hard for BM25 and for dense search alike)
NEAR_MISS = [
    "Do you like dogs? I always wanted one.", "Cities are so expensive nowadays.", "I've heard {city} is beautiful in spring.",
    "My cousin is a {job}, she says it's exhausting.", "Have you ever read {book}?", "Is {hobby} hard to get into?",
    "My neighbour's car is always breaking down.", "I should really learn an instrument some day.",
    "A friend of mine is allergic to everything, poor thing.", "What would you name a puppy?",
    "Moving house is the worst, I never want to do it again.", "{company} is hiring, I saw an advert.",
    "Marathons look so painful on TV.", "I keep meaning to volunteer somewhere.", "Concert tickets cost a fortune now.",
]
WHEN = ["yesterday", "last week", "last weekend", "two days ago", "last month", "on Saturday", "in {month}",
        "a few days ago", "this morning"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


@dataclass
class Question:
    text: str
    evidence: list[int]  # indices into Conversation.turns
    kind: str  # "static", "changed" (the newest of several statements), "event" (when did …)


@dataclass
class Conversation:
    user_id: str
    speakers: tuple[str, str]
    turns: list[dict] = field(default_factory=list)  # memory import lines: {"text", "speaker", "timestamp", "meta"}
    questions: list[Question] = field(default_factory=list)

    def jsonl(self) -> bytes:
        """What `rapport memory import` reads: one turn a line, speaker named."""
        return "".join(json.dumps(turn, ensure_ascii=False) + "\n" for turn in self.turns).encode()


def pick(rng: random.Random, values: list[str], used: set[str]) -> str:
    free = [v for v in values if v not in used] or values
    value = rng.choice(free)
    used.add(value)
    return value


def when(rng: random.Random, clock: datetime) -> str:
    return rng.choice(WHEN).format(month=MONTHS[(clock.month - 2) % 12])


def generate(n_conversations: int = 4, turns: int = 600, split: str = "tune") -> list[Conversation]:
    """`n_conversations` two-person conversations of about `turns` turns each, from the split's own seed."""
    spec = SPLITS[split]
    rng = random.Random(spec["seed"] * 1000 + turns)
    value_half = 0 if split == "tune" else 1
    out = []
    for c in range(n_conversations):
        a, b = rng.sample(spec["names"], 2)
        convo = Conversation(user_id=f"bench:{split}{c}", speakers=(a, b))
        plan = plan_facts(rng, (a, b), turns, value_half, split)
        sessions = max(4, turns // 22)
        per_session = [[] for _ in range(sessions)]
        for item in plan:  # spread the facts over the sessions, keeping their order (changes come after)
            per_session[min(sessions - 1, int(item["at"] * sessions))].append(item)
        clock = datetime(2023, 1, 8, 18, 0, tzinfo=timezone.utc)
        asked: list[tuple[Question, list[str]]] = []
        for s in range(sessions):
            clock += timedelta(days=rng.randint(3, 12), minutes=rng.randint(-120, 120))
            length = max(len(per_session[s]) + 4, round(turns / sessions * rng.uniform(0.7, 1.3)))
            slots = sorted(rng.sample(range(2, length), min(len(per_session[s]), length - 2)))
            facts = dict(zip(slots, per_session[s]))
            speaker = rng.choice((a, b))
            moment = clock
            for t in range(length):
                other = b if speaker == a else a
                moment += timedelta(seconds=rng.randint(20, 240))
                fact = facts.get(t)
                if fact is not None:
                    speaker, other = fact["speaker"], (b if fact["speaker"] == a else a)
                    text = fact["say"].format(when=when(rng, clock), o=other)
                elif t == 0:  # a greeting opens a session, by name now and then
                    text = rng.choice(GREETINGS[:2] if rng.random() < 0.4 else GREETINGS[2:]).format(o=other)
                elif rng.random() < 0.12:
                    text = rng.choice(NEAR_MISS).format(o=other, **near_values(rng, value_half))
                else:
                    text = rng.choice(SMALL_TALK).format(o=other, month=MONTHS[clock.month - 1])
                index = len(convo.turns)
                convo.turns.append({"text": text, "speaker": speaker, "timestamp": moment.isoformat(),
                                    "meta": {"session": s + 1, "turn": index}})
                if fact is not None:
                    fact["index"] = index
                speaker = other
        by_key: dict[str, list[dict]] = {}
        for item in plan:
            if "index" in item:
                by_key.setdefault(item["key"], []).append(item)
        for key, items in by_key.items():
            last = items[-1]  # the newest statement of a fact
            for wording in rng.sample(last["questions"], 1 if last["kind"] == "event" else 2):
                convo.questions.append(Question(wording.format(s=last["speaker"]), [last["index"]], last["kind"]))
        out.append(convo)
    return out


def near_values(rng: random.Random, half: int) -> dict:
    return {"city": rng.choice(CHANGING["city"][half]), "job": rng.choice(STATIC["job"][half]),
            "book": rng.choice(STATIC["book"][half]), "hobby": rng.choice(STATIC["hobby"][half]),
            "company": rng.choice(CHANGING["employer"][half])}


def plan_facts(rng: random.Random, speakers: tuple[str, str], turns: int, half: int, split: str) -> list[dict]:
    """Every fact to be said, with its speaker, its place in the conversation (0..1) and its questions."""
    plan = []
    for speaker in speakers:
        used: set[str] = set()
        for kind, (tune_values, held_values, says, questions) in STATIC.items():
            value = pick(rng, (tune_values, held_values)[half], used)
            plan.append({"key": f"{speaker}/{kind}", "kind": "static", "speaker": speaker, "at": rng.random(),
                         "say": rng.choice(says).replace("{x}", value),
                         "questions": questions[split]})
        for kind, (tune_values, held_values, says, first, questions) in CHANGING.items():
            values = (tune_values, held_values)[half]
            changes = 1 + min(3, turns // 3000)  # a long acquaintance moves more often
            at = sorted(rng.random() for _ in range(changes + 1))
            for i, moment in enumerate(at):
                value = pick(rng, values, used)
                say = first if i == 0 else rng.choice(says)
                plan.append({"key": f"{speaker}/{kind}", "kind": "changed", "speaker": speaker, "at": moment,
                             "say": say.replace("{x}", value), "questions": questions[split]})
        n_events = min(len(EVENTS), max(4, turns // 60))
        for event, asks in rng.sample(EVENTS, n_events):
            plan.append({"key": f"{speaker}/event/{event}", "kind": "event", "speaker": speaker, "at": rng.random(),
                         "say": rng.choice(EVENT_SAY).replace("{e}", event),
                         "questions": [q.replace("{q}", asks[split]) for q in EVENT_ASK[split]]})
    plan.sort(key=lambda item: item["at"])
    return plan
