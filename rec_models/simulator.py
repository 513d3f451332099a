"""A seeded feedback simulator: the project's built-in dataset.

It invents a media/products store (books, albums, guides across 14 categories) and users whose
tastes follow the items' text, then writes their feedback as micro-batch files into a landing
zone, exactly as a real producer would.

How the world works
-------------------
* **Catalog.** Every category has its own vocabulary (adjectives, nouns, themes, a tag pool),
  so titles, descriptions and tags are natural phrases that carry the category's meaning
  ("The Silent Orbit", "A Kitchen of Saffron: Weeknight Dinners"). Each item also gets a
  Zipf-like popularity and a hidden "style" vector (taste beyond words).
* **Users.** Each user likes 1-3 categories (a Dirichlet mixture), a handful of tags drawn from
  those categories, and a style. A user's preference for an item in a category is
  ``TAG_WEIGHT * shared tags + STYLE_WEIGHT * style match + POPULARITY_WEIGHT * log popularity``.
  Tastes drift: the category mixture moves from an early to a late mixture over
  ``DRIFT_DAYS`` after the user joins (for some users a new category appears).
* **Sequences.** Users browse in sessions. Within a session they usually stay in the same
  category and often open an item similar to the previous one (one of its nearest neighbours
  by tags and style), which is the signal a sequential recommender can learn and a
  popularity ranking cannot.
* **Feedback.** How much the user likes the item picks the event type: liked items get clicks,
  likes, high ratings and purchases; disliked ones get skips, dislikes and low ratings.

Batches: batch 0 is the initial history of all ``n_users`` users over ``BATCH0_DAYS`` days;
batch k >= 1 is a ``BATCH_HOURS``-hour micro-batch in which some existing users come back,
about 10% brand-new users arrive, and ``batch_new_items`` new items join the catalog (with a
freshness boost, so they get feedback quickly). Every batch is generated from its own random
stream, so the result depends only on the config and the batch index, never on the order in
which batches are requested.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from rec_models.data.schema import (
    CATALOG_COLUMNS,
    EVENT_COLUMNS,
    EVENT_DTYPES,
    EVENT_TYPES,
    RATING_RANGE,
)
from rec_models.files import write_bytes_atomic


@dataclass(frozen=True)
class SimulatorConfig:
    """Sizes and seed of the simulated world (the defaults give ~80k events in batch 0)."""

    n_items: int = 3000
    n_users: int = 2000
    seed: int = 7
    events_per_user: int = 40  # mean length of a user's initial history (batch 0)
    batch_users: int = 150  # users active in each later batch, ~10% of them brand new
    batch_events_per_user: int = 6
    batch_new_items: int = 25  # catalog additions in each later batch
    start_time: int = 1_700_000_000  # epoch seconds at which batch 0 begins

    def __post_init__(self) -> None:
        if self.n_items < len(CATEGORIES):
            raise ValueError(f"n_items must be at least {len(CATEGORIES)} (one item per category)")
        for name in ("n_users", "events_per_user", "batch_users", "batch_events_per_user"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.batch_new_items < 0:
            raise ValueError("batch_new_items must not be negative")


# --------------------------------------------------------------------------------------------
# The catalog's vocabulary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Category:
    """Words of one store category.

    Title patterns may use ``{adj}``, ``{noun}``, ``{noun2}`` (a second, different noun),
    ``{extra}`` and ``{extra2}`` (a second, different extra word).
    """

    name: str
    kind: str  # what an item is ("novel", "cookbook", "jazz album")
    audience: str  # who it is for, in descriptions
    moods: tuple[str, ...]  # adjectives for descriptions
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    extras: tuple[str, ...]
    title_patterns: tuple[str, ...]
    subtitles: tuple[str, ...]  # appended after a colon when a title is already taken
    themes: tuple[str, ...]
    tags: tuple[str, ...]


CATEGORIES: tuple[Category, ...] = (
    Category(
        name="Science Fiction",
        kind="novel",
        audience="readers",
        moods=("gripping", "mind-bending", "ambitious", "haunting", "fast-paced"),
        adjectives=("Silent", "Distant", "Hollow", "Crimson", "Frozen", "Last", "Broken", "Infinite",
                    "Drifting", "Burning", "Forgotten", "Electric", "Outer", "Dark"),
        nouns=("Orbit", "Star", "Signal", "Colony", "Horizon", "Machine", "Nebula", "Station",
               "Frontier", "Reactor", "Moon", "Voyager", "Singularity", "Eclipse"),
        extras=("Kepler", "Titan", "Europa", "Proxima", "Andromeda", "Ceres", "Vega", "Orion",
                "Tau Ceti", "Ganymede", "Sirius", "Callisto"),
        title_patterns=("The {adj} {noun}", "Beyond the {adj} {noun}", "{adj} {noun}",
                        "Children of {extra}", "The {noun} of {extra}", "Echoes from {extra}",
                        "Return to the {adj} {noun}"),
        subtitles=("A Novel", "Book One", "Book Two", "A Space Opera", "The Outer Rim Saga",
                   "Tales of the Deep Fleet"),
        themes=("first contact", "artificial intelligence", "generation ships", "time travel",
                "the terraforming of Mars", "a galactic war", "a cybernetic rebellion", "a dying sun",
                "alien archaeology", "life aboard a space station"),
        tags=("space opera", "hard sci-fi", "aliens", "robots", "dystopia", "time travel", "cyberpunk",
              "first contact", "space exploration", "post-apocalyptic", "artificial intelligence",
              "military sci-fi"),
    ),
    Category(
        name="Fantasy",
        kind="fantasy novel",
        audience="readers",
        moods=("sweeping", "enchanting", "dark", "epic", "lyrical"),
        adjectives=("Shadowed", "Golden", "Hidden", "Ancient", "Thorned", "Silver", "Winter", "Cursed",
                    "Wandering", "Starlit", "Iron", "Emerald", "Veiled", "Sleeping"),
        nouns=("Crown", "Dragon", "Throne", "Forest", "Blade", "Witch", "Kingdom", "Tower", "Oath",
               "Serpent", "Gate", "Rune", "Harp", "Keep"),
        extras=("Eldermere", "Ashvale", "the North", "Thornwood", "Sundara", "Greymarch", "Valdris",
                "the Hollow Hills", "Myrr", "Caer Lune", "Stormhold", "the Amber Sea"),
        title_patterns=("The {adj} {noun}", "{noun} and {noun2}", "The {noun} of {extra}",
                        "Song of the {adj} {noun}", "The Last {noun} of {extra}",
                        "Heir to the {adj} {noun}"),
        subtitles=("Book One of the Thornwood Saga", "The Ember Trilogy", "A Tale of the Old Kingdoms",
                   "Legends of the North", "The Dragon Wars", "A Fairy Tale Retold"),
        themes=("a quest for a lost crown", "dragon riders", "court intrigue", "an ancient prophecy",
                "wild magic", "a war between fae courts", "a thief with a cursed blade",
                "an exiled heir", "a school for wizards", "forgotten gods"),
        tags=("epic fantasy", "dragons", "magic", "quests", "fae", "sword and sorcery", "coming of age",
              "mythology", "dark fantasy", "witches", "court intrigue", "found family"),
    ),
    Category(
        name="Mystery & Thriller",
        kind="thriller",
        audience="readers",
        moods=("tense", "twisty", "atmospheric", "chilling", "clever"),
        adjectives=("Quiet", "Deadly", "Midnight", "Missing", "Final", "Cold", "Silent", "Hidden",
                    "Broken", "Perfect", "Twelfth", "Crooked", "Empty", "Last"),
        nouns=("Witness", "Alibi", "Harbour", "Confession", "Cipher", "Verdict", "Lighthouse",
               "Stranger", "Motive", "Inheritance", "Suspect", "Dossier", "Ledger", "Orchard"),
        extras=("Blackwater", "Ravenscourt", "Harrow Lane", "the Old Mill", "the Lighthouse Inn",
                "Platform Nine", "the Marsh", "Wren Hall", "Kingsbridge", "the Grand Hotel",
                "Fenwick Manor", "the Night Train"),
        title_patterns=("The {adj} {noun}", "The {noun} at {extra}", "Death at {extra}", "{adj} {noun}",
                        "The {noun} Affair", "Murder at {extra}"),
        subtitles=("A Detective Novel", "An Inspector Hale Mystery", "A Thriller", "A Cold Case Novel",
                   "A Harbour Town Mystery", "The Night Files"),
        themes=("a small-town murder", "a missing heiress", "a locked-room puzzle",
                "a detective haunted by an old case", "corporate espionage", "a stolen painting",
                "a cold case reopened", "a conspiracy inside the police", "a poisoned dinner party",
                "a kidnapping on a night train"),
        tags=("detective", "whodunit", "psychological thriller", "crime", "police procedural",
              "cozy mystery", "espionage", "suspense", "noir", "heist", "legal thriller", "cold case"),
    ),
    Category(
        name="Romance",
        kind="love story",
        audience="readers",
        moods=("heartwarming", "swoony", "witty", "tender", "charming"),
        adjectives=("Summer", "Sweet", "Reckless", "Secret", "Forever", "Stolen", "Autumn", "Wild",
                    "Tender", "Lost", "Endless", "Unexpected", "Moonlit", "Golden"),
        nouns=("Kiss", "Promise", "Heart", "Letter", "Vow", "Bloom", "Waltz", "Affair", "Season", "Tide",
               "Dance", "Wish", "Rose", "Proposal"),
        extras=("Paris", "Provence", "Cornwall", "Capri", "Vienna", "Willow Creek", "Nantucket",
                "Seville", "Lake Como", "Edinburgh", "Santorini", "Maple Bay"),
        title_patterns=("The {adj} {noun}", "A {adj} {noun}", "One {adj} {noun}", "A {noun} in {extra}",
                        "Love Letters from {extra}", "The {noun} at {extra}"),
        subtitles=("A Love Story", "A Small-Town Romance", "A Summer Novel", "A Second Chance Romance",
                   "A Holiday Romance", "The Willow Creek Series"),
        themes=("second-chance love", "a fake engagement", "enemies who fall in love",
                "a small-town bakery", "a royal wedding", "letters between strangers",
                "a summer in Provence", "a forbidden office romance", "a widowed single father",
                "a holiday reunion"),
        tags=("contemporary romance", "historical romance", "enemies to lovers", "second chance",
              "small town", "rom-com", "slow burn", "royalty", "holiday romance", "friends to lovers",
              "regency", "love triangle"),
    ),
    Category(
        name="History",
        kind="history",
        audience="history lovers",
        moods=("vivid", "authoritative", "sweeping", "meticulously researched", "readable"),
        adjectives=("Forgotten", "Iron", "Imperial", "Great", "Lost", "Medieval", "Silent", "Golden",
                    "Ancient", "Rising", "Fallen", "Long", "Hidden", "Burning"),
        nouns=("Empire", "Republic", "Revolution", "Crusade", "Dynasty", "Frontier", "Siege", "Century",
               "Armada", "Kingdom", "Age", "Campaign", "Treaty", "Harvest"),
        extras=("Rome", "Byzantium", "Venice", "the Ottomans", "the Tudors", "Carthage", "the Ming",
                "the Vikings", "the Incas", "Napoleon", "the Pharaohs", "the Hanseatic League"),
        title_patterns=("The {adj} {noun}", "A History of the {adj} {noun}", "{noun} and {noun2}",
                        "The Last {noun} of {extra}", "{extra} and the {adj} {noun}",
                        "The Rise and Fall of {extra}"),
        subtitles=("A New History", "How the Modern World Began", "An Illustrated History",
                   "The Untold Story", "A Narrative History", "From the Archives"),
        themes=("the fall of Rome", "the Napoleonic wars", "the Silk Road", "the Industrial Revolution",
                "medieval trade", "the Ottoman court", "the Second World War", "the age of exploration",
                "ancient Egypt", "the Cold War"),
        tags=("ancient history", "medieval", "military history", "biography", "world war ii", "empires",
              "archaeology", "revolution", "cold war", "maritime history", "social history",
              "renaissance"),
    ),
    Category(
        name="Cooking",
        kind="cookbook",
        audience="home cooks",
        moods=("generous", "inspiring", "practical", "mouth-watering", "beautifully photographed"),
        adjectives=("Rustic", "Simple", "Slow", "Golden", "Smoky", "Fresh", "Honest", "Spiced", "Salted",
                    "Sunday", "Weeknight", "Bright", "Coastal", "Green"),
        nouns=("Saffron", "Sourdough", "Lemon", "Garlic", "Thyme", "Chili", "Olive", "Butter", "Miso",
               "Fennel", "Ginger", "Honey", "Cardamom", "Tomato"),
        extras=("Kitchen", "Table", "Pantry", "Oven", "Skillet", "Larder", "Hearth", "Bakery", "Garden",
                "Market", "Feast", "Supper"),
        title_patterns=("A Kitchen of {noun}", "{noun} and {noun2}", "The {adj} {extra}",
                        "Cooking with {noun}", "The {noun} {extra}", "Salt, {noun} and {noun2}"),
        subtitles=("Weeknight Dinners", "Recipes for Every Season", "Simple Food for Busy Days",
                   "Breads, Bakes and Sweets", "A Year of Sunday Lunches", "Plant-Based Plates"),
        themes=("weeknight dinners", "sourdough baking", "Mediterranean cooking", "plant-based meals",
                "Japanese home cooking", "slow braises", "spice blends", "seasonal vegetables",
                "holiday baking", "Mexican street food"),
        tags=("baking", "vegetarian", "vegan", "quick meals", "mediterranean", "asian cuisine",
              "desserts", "bread", "grilling", "healthy eating", "comfort food", "meal prep"),
    ),
    Category(
        name="Travel",
        kind="travel guide",
        audience="travellers",
        moods=("evocative", "practical", "inspiring", "witty", "richly illustrated"),
        adjectives=("Hidden", "Wild", "Slow", "Secret", "Sunlit", "Quiet", "Unseen", "Timeless",
                    "Essential", "Rugged", "Untold", "Wandering", "Forgotten", "Coastal"),
        nouns=("Lisbon", "Patagonia", "Kyoto", "Iceland", "Morocco", "Sicily", "Vietnam", "Scotland",
               "Peru", "Istanbul", "Norway", "Tasmania", "Oaxaca", "Crete"),
        extras=("on Foot", "by Rail", "by Bicycle", "by Boat", "on a Budget", "in Winter",
                "for Food Lovers", "with Children", "after Dark", "in Spring"),
        title_patterns=("{adj} {noun}", "{noun} {extra}", "A Year in {noun}", "The Road to {noun}",
                        "{adj} {noun} {extra}"),
        subtitles=("A Traveller's Guide", "Journeys off the Beaten Path", "A Walking Companion",
                   "Stories from the Road", "The Pocket Guide", "Second Edition"),
        themes=("train journeys", "island hopping", "mountain hikes", "street markets",
                "backpacking on a budget", "road trips", "old harbour towns", "desert crossings",
                "city walks", "food tours"),
        tags=("adventure travel", "budget travel", "hiking", "road trip", "city guide", "europe", "asia",
              "south america", "islands", "rail travel", "travel memoir", "off the beaten path"),
    ),
    Category(
        name="Gardening",
        kind="gardening guide",
        audience="gardeners",
        moods=("practical", "inspiring", "down-to-earth", "lavishly illustrated", "friendly"),
        adjectives=("Wild", "Cottage", "Small", "Shady", "Urban", "Edible", "Native", "Dry", "Winter",
                    "Secret", "Balcony", "Meadow", "Kitchen", "Gravel"),
        nouns=("Garden", "Border", "Orchard", "Greenhouse", "Allotment", "Hedgerow", "Pond", "Courtyard",
               "Plot", "Terrace", "Patch", "Windowsill"),
        extras=("Roses", "Tomatoes", "Herbs", "Dahlias", "Ferns", "Succulents", "Apple Trees", "Bulbs",
                "Peonies", "Lavender", "Salad Leaves", "Wildflowers", "Clematis", "Chillies"),
        title_patterns=("The {adj} {noun}", "Growing {extra}", "{extra} for the {adj} {noun}",
                        "A Year in the {adj} {noun}", "The {extra} Handbook", "{extra} and {extra2}"),
        subtitles=("A Practical Guide", "Planting for Every Season", "The Complete Handbook",
                   "Small Space, Big Harvest", "A Gardener's Year", "Organic Methods"),
        themes=("composting", "attracting pollinators", "growing vegetables in small spaces",
                "pruning fruit trees", "drought-tolerant planting", "seasonal planting plans",
                "raised beds", "organic pest control", "propagating cuttings",
                "designing with perennials"),
        tags=("vegetables", "flowers", "organic gardening", "small spaces", "houseplants", "fruit trees",
              "composting", "garden design", "wildlife garden", "herbs", "perennials",
              "container gardening"),
    ),
    Category(
        name="Fitness",
        kind="training guide",
        audience="active people",
        moods=("motivating", "no-nonsense", "science-based", "practical", "energising"),
        adjectives=("Strong", "Lean", "Everyday", "Functional", "Explosive", "Mindful", "Total",
                    "Fearless", "Steady", "Daily", "Lifelong", "Relentless", "Simple", "Balanced"),
        nouns=("Body", "Stride", "Core", "Mile", "Lift", "Flow", "Engine", "Recovery", "Posture",
               "Balance", "Stamina", "Athlete"),
        extras=("Marathon", "5K", "Kettlebell", "Yoga", "Pilates", "Cycling", "Rowing", "Mobility",
                "Strength", "Swimming", "HIIT", "Stretching"),
        title_patterns=("The {adj} {noun}", "{extra} for Life", "{adj} {extra}", "The {extra} Method",
                        "Thirty Days of {extra}", "The {adj} {extra} Plan"),
        subtitles=("A 12-Week Programme", "Train Smarter, Not Harder", "The Beginner's Edition",
                   "Workouts for Busy People", "Second Edition", "Science-Based Training"),
        themes=("strength training", "marathon preparation", "mobility and stretching",
                "high-intensity intervals", "yoga for runners", "injury recovery",
                "nutrition for athletes", "bodyweight workouts", "building endurance",
                "healthy daily habits"),
        tags=("strength training", "running", "yoga", "hiit", "nutrition", "weight loss", "pilates",
              "cycling", "mobility", "bodyweight", "endurance", "wellness"),
    ),
    Category(
        name="Jazz",
        kind="jazz album",
        audience="listeners",
        moods=("swinging", "smoky", "soulful", "adventurous", "laid-back"),
        adjectives=("Blue", "Midnight", "Smoky", "Late", "Velvet", "Swinging", "Lonely", "Electric",
                    "Cool", "Golden", "Quiet", "Moonlit", "Crescent", "Bitter"),
        nouns=("Trumpet", "Avenue", "Lounge", "Train", "Serenade", "Groove", "Bird", "Street", "Hour",
               "Room", "Session", "Ballad", "Rain", "Corner"),
        extras=("Harlem", "New Orleans", "Kansas City", "Paris", "Chicago", "Havana", "Tokyo",
                "Copenhagen", "Montreux", "Newport", "Memphis", "Rio"),
        title_patterns=("{adj} {noun}", "The {adj} {noun}", "Live in {extra}", "{adj} Nights in {extra}",
                        "{noun} in {extra}", "Round About {extra}"),
        subtitles=("Live Session", "Remastered", "The Complete Recordings", "Deluxe Edition",
                   "Quartet Sessions", "Live at the Blue Door"),
        themes=("bebop improvisation", "late-night piano trios", "big band swing", "modal jazz",
                "Latin rhythms", "smoky vocal ballads", "hard bop", "jazz fusion", "saxophone solos",
                "New Orleans brass bands"),
        tags=("bebop", "swing", "cool jazz", "jazz vocals", "piano trio", "big band", "fusion",
              "latin jazz", "hard bop", "saxophone", "live recording", "smooth jazz"),
    ),
    Category(
        name="Classical Music",
        kind="recording",
        audience="listeners",
        moods=("luminous", "dramatic", "refined", "deeply felt", "radiant"),
        adjectives=("C Major", "C Minor", "D Major", "D Minor", "E-flat Major", "E Minor", "F Major",
                    "F Minor", "G Major", "G Minor", "A Major", "A Minor", "B-flat Major", "B Minor"),
        nouns=("Symphony", "Piano Concerto", "Violin Concerto", "String Quartet", "Piano Sonata",
               "Cello Suite", "Mass", "Piano Trio", "Cello Sonata", "Sinfonia", "Serenade", "Fantasia"),
        extras=("Mozart", "Beethoven", "Bach", "Brahms", "Schubert", "Haydn", "Vivaldi", "Dvořák",
                "Mendelssohn", "Tchaikovsky", "Schumann", "Handel", "Chopin", "Debussy"),
        title_patterns=("{extra}: {noun} in {adj}", "{extra}: {noun} in {adj}", "{extra}: {noun} in {adj}",
                        "The Essential {extra}", "{extra} by Candlelight", "{extra} and {extra2}"),
        subtitles=("Berlin Recording", "Complete Edition", "Live from Vienna", "Period Instruments",
                   "Remastered", "Chamber Orchestra of Prague"),
        themes=("romantic symphonies", "baroque counterpoint", "solo piano works", "string quartets",
                "sacred choral music", "opera arias", "chamber music", "violin concertos",
                "minimalist compositions", "early music on period instruments"),
        tags=("baroque", "romantic", "symphony", "piano", "opera", "chamber music", "choral", "violin",
              "orchestral", "minimalism", "early music", "concerto"),
    ),
    Category(
        name="Photography",
        kind="photography book",
        audience="photographers",
        moods=("inspiring", "hands-on", "stunning", "thoughtful", "clear"),
        adjectives=("Street", "Natural", "Candid", "Quiet", "Wild", "Urban", "Honest", "Analog", "Night",
                    "Coastal", "Northern", "Fading", "Golden", "Hidden"),
        nouns=("Light", "Frame", "Lens", "Shadow", "Moment", "Exposure", "Portrait", "Horizon",
               "Silhouette", "Contrast", "Focus", "Grain"),
        extras=("Landscapes", "Portraits", "Street Scenes", "Wildlife", "Cities at Night", "Film Cameras",
                "the Night Sky", "Black and White", "Weddings", "Architecture", "Food", "Travel"),
        title_patterns=("The {adj} {noun}", "Chasing {noun}", "Photographing {extra}", "Mastering {extra}",
                        "Through the {adj} {noun}", "The Art of {extra}", "{adj} {noun}"),
        subtitles=("A Field Guide", "Lessons in Light and Composition", "From Snapshot to Print",
                   "A Photographer's Notebook", "The Complete Course", "Collected Photographs"),
        themes=("composition", "natural light", "street photography", "portrait lighting",
                "landscape photography", "film cameras", "photo editing", "wildlife photography",
                "black-and-white printing", "night skies"),
        tags=("street photography", "portraits", "landscape", "film photography", "lighting",
              "composition", "photo editing", "wildlife", "black and white", "travel photography",
              "astrophotography", "camera gear"),
    ),
    Category(
        name="Children's Books",
        kind="picture book",
        audience="young readers",
        moods=("playful", "cosy", "funny", "gentle", "colourful"),
        adjectives=("Little", "Brave", "Sleepy", "Curious", "Giant", "Tiny", "Grumpy", "Happy", "Busy",
                    "Silly", "Lost", "Friendly", "Hungry", "Shy"),
        nouns=("Fox", "Bear", "Dragon", "Owl", "Rabbit", "Penguin", "Robot", "Elephant", "Mouse", "Whale",
               "Hedgehog", "Tiger", "Duck", "Giraffe"),
        extras=("Learns to Swim", "Finds a Friend", "Goes to School", "Can't Sleep", "Has a Birthday",
                "Says Sorry", "Visits the Sea", "Loses a Tooth", "Bakes a Cake", "Goes Camping",
                "Counts the Stars", "Plants a Seed"),
        title_patterns=("The {adj} {noun}", "{adj} {noun} {extra}", "{noun} and the {adj} {noun2}",
                        "Goodnight, {adj} {noun}", "Where Is {adj} {noun}?", "{adj} {noun} {extra}"),
        subtitles=("A Bedtime Story", "A Lift-the-Flap Book", "A Counting Book", "Read-Aloud Edition",
                   "A Rhyming Story", "Big Picture Edition"),
        themes=("friendship", "bedtime", "sharing", "the first day at school", "counting and colours",
                "being brave", "animals of the forest", "kindness", "making mistakes",
                "exploring the ocean"),
        tags=("picture book", "bedtime story", "animals", "early readers", "friendship", "rhyming",
              "learning", "adventure", "humour", "emotions", "ages 3-5", "ages 6-8"),
    ),
    Category(
        name="Business",
        kind="business book",
        audience="professionals",
        moods=("sharp", "practical", "insightful", "provocative", "clear-eyed"),
        adjectives=("Lean", "Agile", "Remarkable", "Quiet", "Focused", "Resilient", "Essential", "Hidden",
                    "Modern", "Practical", "Creative", "Fearless", "Effective", "Open"),
        nouns=("Leader", "Startup", "Strategy", "Team", "Negotiator", "Manager", "Brand", "Advantage",
               "Organisation", "Founder", "Habit", "Pitch", "Company", "Mindset"),
        extras=("Growth", "Influence", "Focus", "Scale", "Trust", "Pricing", "Hiring", "Change",
                "Execution", "Culture", "Negotiation", "Decisions"),
        title_patterns=("The {adj} {noun}", "The {noun} Playbook", "Building the {adj} {noun}",
                        "The Art of {extra}", "{extra} by Design", "{extra} Without Fear"),
        subtitles=("How Great Teams Win", "Lessons from the Front Line", "A Practical Guide",
                   "Rules for Growth", "Strategies That Work", "What the Best Companies Know"),
        themes=("leadership", "negotiation", "startup fundraising", "remote teams", "marketing strategy",
                "personal productivity", "decision making", "company culture", "pricing strategy",
                "customer research"),
        tags=("leadership", "entrepreneurship", "management", "marketing", "productivity", "finance",
              "strategy", "negotiation", "startups", "career", "economics", "innovation"),
    ),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
GLOBAL_TAGS = ("staff pick", "award winner", "bestseller", "gift idea", "new release")
# Every tag any item can carry, in a fixed order (the columns of the tag matrices below).
TAG_VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys([t for c in CATEGORIES for t in c.tags] + list(GLOBAL_TAGS)))
_TAG_INDEX = {tag: i for i, tag in enumerate(TAG_VOCABULARY)}

DESCRIPTION_OPENERS = (
    "{A_mood} {kind} about {t1} and {t2}.",
    "This {mood} {kind} explores {t1}, with {t2} at its heart.",
    "{A_mood} {kind} that brings together {t1} and {t2}.",
)
DESCRIPTION_CLOSERS = (
    "Perfect for {audience} who love {t3}.",
    "A must for {audience} curious about {t3}.",
    "It also has plenty to say about {t3}.",
)
POSITIVE_REVIEWS = (
    "Loved this {kind}, especially the part about {theme}.",
    "Wonderful: {theme} done right.",
    "Five stars. A fresh take on {theme}.",
    "Exactly what I hoped for; I keep coming back to it.",
)
NEGATIVE_REVIEWS = (
    "Not for me; the part about {theme} felt flat.",
    "Expected more from a {kind} about {theme}.",
    "Couldn't get into it, sadly.",
    "Too slow for my taste.",
)

# --------------------------------------------------------------------------------------------
# Behaviour knobs (documented here rather than in the config: they shape the world, not its size)
# --------------------------------------------------------------------------------------------

BATCH0_DAYS = 90  # span of the initial history
BATCH_HOURS = 6  # span of each later micro-batch
DRIFT_DAYS = 60  # time for a user's taste to move fully from early to late mixture
NEW_USER_SHARE = 0.1  # share of brand-new users among a later batch's active users
DRIFT_USER_SHARE = 0.4  # users who pick up a new favourite category over time
DRIFT_CATEGORY_WEIGHT = 0.3
FAVOURITE_COUNT_PROBS = (0.3, 0.45, 0.25)  # P(1, 2, 3 favourite categories)
FAVOURITE_TAG_DRAWS = 5  # tags drawn (with repeats) from a user's favourite categories
STYLE_DIM = 8

ZIPF_EXPONENT = 1.0  # popularity of the item of popularity rank r is ~ (r + 1) ** -ZIPF_EXPONENT
TAG_WEIGHT = 1.0  # preference per tag shared by the user and the item
STYLE_WEIGHT = 0.6
POPULARITY_WEIGHT = 0.4  # a mild global popularity term
NEW_ITEM_BOOST = 2.0  # extra preference for an item in its arrival batch, halving each batch after

P_NEW_SESSION = 1 / 7  # chance an event opens a new session (mean session length ~7)
P_STAY_IN_CATEGORY = 0.75  # within a session: keep browsing the previous event's category
P_FOLLOW_SIMILAR = 0.6  # when staying: open one of the previous item's nearest neighbours
P_EXPLORE = 0.08  # a new category is drawn uniformly instead of from the user's taste
N_NEIGHBOURS = 10
NEIGHBOUR_STYLE_WEIGHT = 0.5  # item similarity = tag cosine + this * style cosine

IN_SESSION_GAP_MIN_S = 5.0  # seconds between events of one session: min + exponential(mean)
IN_SESSION_GAP_MEAN_S = 60.0
ACTIVE_SPAN_RANGE = (0.5, 1.0)  # share of their remaining window a user's sessions spread over

# How much a user likes an item: sigmoid(bias + weights * evidence + noise) in (0, 1).
LIKING_BIAS = -1.8
LIKING_IN_TASTE = 2.5  # the item's category is in the user's current taste at all
LIKING_CATEGORY_WEIGHT = 1.5  # times the category's share of the current taste
LIKING_TAG = 0.7  # per shared tag (capped at 3)
LIKING_NOISE = 0.6
# Event-type mixtures (in EVENT_TYPES order) for a fully liked and a fully disliked item; an
# event's mixture interpolates between them by its liking.
_MIX_LIKED = {"view": 0.44, "click": 0.24, "like": 0.12, "rating": 0.07, "purchase": 0.06,
              "review": 0.03, "skip": 0.03, "dislike": 0.01}
_MIX_DISLIKED = {"view": 0.40, "click": 0.08, "like": 0.01, "rating": 0.06, "purchase": 0.005,
                 "review": 0.015, "skip": 0.32, "dislike": 0.11}
EVENT_MIX_LIKED = np.array([_MIX_LIKED[t] for t in EVENT_TYPES])
EVENT_MIX_DISLIKED = np.array([_MIX_DISLIKED[t] for t in EVENT_TYPES])

# Independent random streams: (seed, stream, batch) seeds one numpy Generator.
_STREAM_SHARES, _STREAM_ITEMS, _STREAM_USERS, _STREAM_EVENTS = 1, 2, 3, 4
_EVENTS_FILE = re.compile(r"events-(\d+)\.jsonl")


def _rng(seed: int, stream: int, batch: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, batch])


# --------------------------------------------------------------------------------------------
# Internal tables: dataclasses of equal-length numpy arrays, one row per item / user
# --------------------------------------------------------------------------------------------

_Table = TypeVar("_Table")


def _stack(parts: list[_Table]) -> _Table:
    """Concatenate tables of the same dataclass field by field."""
    return type(parts[0])(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(parts[0])})


def _take(table: _Table, rows: np.ndarray) -> _Table:
    return type(table)(**{f.name: getattr(table, f.name)[rows] for f in fields(table)})


@dataclass
class _Items:
    ids: np.ndarray  # "i00017" strings (object)
    category: np.ndarray  # index into CATEGORIES
    tags: np.ndarray  # (n, len(TAG_VOCABULARY)) 0/1 float32
    style: np.ndarray  # (n, STYLE_DIM) unit vectors
    log_popularity: np.ndarray
    arrival: np.ndarray  # batch in which the item joined the catalog
    lead_theme: np.ndarray  # the item's main theme (object), quoted by reviews


@dataclass
class _Users:
    index: np.ndarray  # global user number: "u{index:05d}"
    early_taste: np.ndarray  # (n, n_categories) category mixture when the user joins
    late_taste: np.ndarray  # (n, n_categories) mixture DRIFT_DAYS later
    tags: np.ndarray  # (n, len(TAG_VOCABULARY)) 0/1 float32: favourite tags
    style: np.ndarray  # (n, STYLE_DIM)
    join_time: np.ndarray  # epoch seconds of the user's first event


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


class FeedbackSimulator:
    """Deterministic generator of a catalog, users and their feedback, batch by batch."""

    def __init__(self, config: SimulatorConfig | None = None):
        self.config = config or SimulatorConfig()
        self._n_new_users = max(1, round(NEW_USER_SHARE * self.config.batch_users))
        self._category_shares = _rng(self.config.seed, _STREAM_SHARES, 0).dirichlet(np.full(len(CATEGORIES), 8.0))
        # Catalog batches are built in order (titles must stay distinct across batches) and cached.
        self._item_batches: list[_Items] = []
        self._catalog_frames: list[pd.DataFrame] = []
        self._titles: set[str] = set()
        self._user_groups: dict[int, _Users] = {}

    # -- public API ---------------------------------------------------------------------------

    def catalog(self) -> pd.DataFrame:
        """The initial catalog: ``n_items`` rows with the columns of ``CATALOG_COLUMNS``."""
        self._items_through(0)
        return self._catalog_frames[0].copy()

    def catalog_update(self, batch: int) -> pd.DataFrame:
        """Items that join the catalog with batch ``batch`` (none for batch 0)."""
        _check_batch(batch)
        if batch == 0:
            return _empty_catalog()
        self._items_through(batch)
        return self._catalog_frames[batch].copy()

    def events(self, batch: int) -> pd.DataFrame:
        """Batch 0: every initial user's history; batch k >= 1: one micro-batch of feedback."""
        _check_batch(batch)
        cfg = self.config
        rng = _rng(cfg.seed, _STREAM_EVENTS, batch)
        window_start, window_end = self._window(batch)
        if batch == 0:
            users = self._user_group(0)
            first_time = users.join_time
            # At least 3 events each (fewer if the mean is lower), plus a negative binomial:
            # a long tail of heavy users around the requested mean.
            shortest = min(3, cfg.events_per_user)
            extra = cfg.events_per_user - shortest
            lengths = shortest + rng.negative_binomial(2, 2 / (2 + extra), size=len(users.index))
        else:
            n_known = cfg.n_users + (batch - 1) * self._n_new_users
            n_returning = min(cfg.batch_users - self._n_new_users, n_known)
            returning = np.sort(rng.choice(n_known, size=n_returning, replace=False))
            users = _stack([self._users_by_index(returning), self._user_group(batch)])
            first_time = np.concatenate([
                window_start + rng.uniform(0, 0.5, n_returning) * (window_end - window_start),
                users.join_time[n_returning:],
            ])
            lengths = 1 + rng.poisson(cfg.batch_events_per_user - 1, size=len(users.index))
        return self._simulate(batch, users, first_time, lengths, window_end, rng)

    def user_profiles(self, batch: int = 0) -> pd.DataFrame:
        """Hidden tastes of every user that exists by ``batch``: one row per user with
        ``user_id``, ``favourite_categories`` (by weight, heaviest first), ``favourite_tags``,
        ``drift_category`` (a category the user grows into, or None) and ``joined_at``."""
        _check_batch(batch)
        users = _stack([self._user_group(g) for g in range(batch + 1)])
        rows = []
        for i in range(len(users.index)):
            early, late = users.early_taste[i], users.late_taste[i]
            favourites = [CATEGORY_NAMES[c] for c in np.argsort(-early, kind="stable") if early[c] > 0]
            drift = [CATEGORY_NAMES[c] for c in np.flatnonzero((late > 0) & (early == 0))]
            rows.append({
                "user_id": _user_id(users.index[i]),
                "favourite_categories": favourites,
                "favourite_tags": [TAG_VOCABULARY[t] for t in np.flatnonzero(users.tags[i])],
                "drift_category": drift[0] if drift else None,
                "joined_at": int(users.join_time[i]),
            })
        return pd.DataFrame(rows)

    def write_batch(self, landing_zone: Path | str, batch: int) -> list[Path]:
        """Write batch ``batch`` into the landing zone as JSON Lines and return the file paths.

        The catalog file (if the batch has catalog rows) is written before the events file, so
        a watcher never sees feedback on items it cannot know yet. Each file appears atomically
        and an identical existing file is left untouched."""
        zone = Path(landing_zone)
        catalog = self.catalog() if batch == 0 else self.catalog_update(batch)
        paths = []
        if len(catalog):
            paths.append(_write_if_changed(zone / "catalog" / f"catalog-{batch:05d}.jsonl", _to_jsonl(catalog)))
        paths.append(_write_if_changed(zone / "events" / f"events-{batch:05d}.jsonl", _to_jsonl(self.events(batch))))
        return paths

    # -- time ---------------------------------------------------------------------------------

    def _window(self, batch: int) -> tuple[int, int]:
        """[start, end) epoch seconds of a batch's events."""
        day, hour = 86_400, 3_600
        if batch == 0:
            return self.config.start_time, self.config.start_time + BATCH0_DAYS * day
        start = self.config.start_time + BATCH0_DAYS * day + (batch - 1) * BATCH_HOURS * hour
        return start, start + BATCH_HOURS * hour

    # -- catalog ------------------------------------------------------------------------------

    def _items_through(self, batch: int) -> _Items:
        """All items that exist by ``batch`` (building and caching missing batches in order)."""
        cfg = self.config
        while len(self._item_batches) <= batch:
            b = len(self._item_batches)
            count = cfg.n_items if b == 0 else cfg.batch_new_items
            first_index = 0 if b == 0 else cfg.n_items + (b - 1) * cfg.batch_new_items
            items, frame = self._make_items(b, first_index, count)
            self._item_batches.append(items)
            self._catalog_frames.append(frame)
        return _stack(self._item_batches[: batch + 1])

    def _make_items(self, batch: int, first_index: int, count: int) -> tuple[_Items, pd.DataFrame]:
        rng = _rng(self.config.seed, _STREAM_ITEMS, batch)
        n_cat = len(CATEGORIES)
        if batch == 0:  # every category gets at least one item
            rest = rng.choice(n_cat, count - n_cat, p=self._category_shares)
            category = rng.permutation(np.concatenate([np.arange(n_cat), rest]))
            log_popularity = -ZIPF_EXPONENT * np.log1p(rng.permutation(count))
        else:
            category = rng.choice(n_cat, count, p=self._category_shares)
            log_popularity = -ZIPF_EXPONENT * np.log1p(rng.integers(0, self.config.n_items, count))
        style = rng.normal(size=(count, STYLE_DIM))
        style /= np.linalg.norm(style, axis=1, keepdims=True)
        words = rng.random((count, 14))  # uniforms that pick each item's words (see _title, _description)
        theme_keys = rng.random((count, max(len(c.themes) for c in CATEGORIES)))
        tag_keys = rng.random((count, max(len(c.tags) for c in CATEGORIES)))

        rows, lead_themes = [], []
        tag_matrix = np.zeros((count, len(TAG_VOCABULARY)), dtype=np.float32)
        for i in range(count):
            cat = CATEGORIES[category[i]]
            u = words[i]
            themes = [cat.themes[t] for t in np.argsort(theme_keys[i, : len(cat.themes)])[:3]]
            tags = [cat.tags[t] for t in np.argsort(tag_keys[i, : len(cat.tags)])[: 2 + int(u[8] * 4)]]
            if u[9] < 0.12:  # a tag borrowed from another category
                other = CATEGORIES[(category[i] + 1 + int(u[10] * (n_cat - 1))) % n_cat]
                tags.append(_pick(other.tags, u[11]))
            if u[9] > 0.92:
                tags.append(_pick(GLOBAL_TAGS, u[10]))
            tags = list(dict.fromkeys(tags))
            tag_matrix[i, [_TAG_INDEX[t] for t in tags]] = 1.0
            lead_themes.append(themes[0])
            rows.append({
                "item_id": _item_id(first_index + i),
                "title": self._distinct_title(cat, u),
                "description": _description(cat, themes, u),
                "category": cat.name,
                "tags": tags,
            })
        items = _Items(
            ids=np.array([r["item_id"] for r in rows], dtype=object),
            category=category,
            tags=tag_matrix,
            style=style,
            log_popularity=log_popularity,
            arrival=np.full(count, batch),
            lead_theme=np.array(lead_themes, dtype=object),
        )
        frame = pd.DataFrame(rows, columns=CATALOG_COLUMNS) if rows else _empty_catalog()
        for column in ("item_id", "title", "description", "category"):
            frame[column] = frame[column].astype("string")
        return items, frame

    def _distinct_title(self, cat: Category, u: np.ndarray) -> str:
        """A title not used before: a pattern's title, else with a subtitle, else "Vol. n"."""
        base = _title(cat, u)
        start = int(u[5] * len(cat.subtitles))
        subtitles = cat.subtitles[start:] + cat.subtitles[:start]
        candidates = itertools.chain(
            [base], (f"{base}: {s}" for s in subtitles), (f"{base}, Vol. {v}" for v in itertools.count(2))
        )
        title = next(t for t in candidates if t not in self._titles)
        self._titles.add(title)
        return title

    # -- users --------------------------------------------------------------------------------

    def _user_group(self, group: int) -> _Users:
        """Group 0: the initial users; group k >= 1: the users new in batch k."""
        if group in self._user_groups:
            return self._user_groups[group]
        cfg = self.config
        rng = _rng(cfg.seed, _STREAM_USERS, group)
        n = cfg.n_users if group == 0 else self._n_new_users
        first = 0 if group == 0 else cfg.n_users + (group - 1) * self._n_new_users
        n_cat = len(CATEGORIES)
        rows = np.arange(n)[:, None]

        # Categories in a random order per user: the first 1-3 are favourites, the next one
        # is where drifting users' tastes go.
        ranked = np.argsort(rng.random((n, n_cat)), axis=1)
        n_favourites = rng.choice([1, 2, 3], size=n, p=FAVOURITE_COUNT_PROBS)
        is_favourite = np.arange(3)[None, :] < n_favourites[:, None]
        early = np.zeros((n, n_cat))
        early[rows, ranked[:, :3]] = rng.gamma(1.5, size=(n, 3)) * is_favourite
        early /= early.sum(axis=1, keepdims=True)
        late = np.zeros((n, n_cat))
        late[rows, ranked[:, :3]] = rng.gamma(1.5, size=(n, 3)) * is_favourite
        late /= late.sum(axis=1, keepdims=True)
        drifts = rng.random(n) < DRIFT_USER_SHARE
        late *= np.where(drifts, 1 - DRIFT_CATEGORY_WEIGHT, 1.0)[:, None]
        late[np.arange(n), ranked[:, 3]] += np.where(drifts, DRIFT_CATEGORY_WEIGHT, 0.0)

        # Favourite tags: pick favourite categories by weight, then a tag from each one's pool.
        slot_weights = np.repeat(early, FAVOURITE_TAG_DRAWS, axis=0)
        slot_category = _sample_rows(slot_weights, rng.random(n * FAVOURITE_TAG_DRAWS)).reshape(n, FAVOURITE_TAG_DRAWS)
        pool_size = np.array([len(c.tags) for c in CATEGORIES])
        pools = np.array([[_TAG_INDEX[c.tags[j % len(c.tags)]] for j in range(pool_size.max())] for c in CATEGORIES])
        picks = (rng.random((n, FAVOURITE_TAG_DRAWS)) * pool_size[slot_category]).astype(int)
        tags = np.zeros((n, len(TAG_VOCABULARY)), dtype=np.float32)
        tags[rows, pools[slot_category, picks]] = 1.0

        if group == 0:  # initial users join during the first 60% of batch 0
            join_time = cfg.start_time + rng.uniform(0, 0.6 * BATCH0_DAYS * 86_400, n)
        else:
            start, end = self._window(group)
            join_time = start + rng.uniform(0, 0.5, n) * (end - start)
        users = _Users(
            index=np.arange(first, first + n),
            early_taste=early,
            late_taste=late,
            tags=tags,
            style=rng.normal(size=(n, STYLE_DIM)),
            join_time=join_time,
        )
        self._user_groups[group] = users
        return users

    def _users_by_index(self, index: np.ndarray) -> _Users:
        """Profiles of the users with these global numbers (sorted ascending, any groups)."""
        cfg = self.config
        group = np.where(index < cfg.n_users, 0, 1 + (index - cfg.n_users) // self._n_new_users)
        parts = [_take(self._user_group(0), index[:0])]  # an empty start, for an empty index
        for g in np.unique(group):  # groups hold consecutive numbers, so the order is kept
            members = self._user_group(int(g))
            parts.append(_take(members, index[group == g] - members.index[0]))
        return _stack(parts)

    # -- behaviour ----------------------------------------------------------------------------

    def _simulate(self, batch: int, users: _Users, first_time: np.ndarray, lengths: np.ndarray,
                  window_end: int, rng: np.random.Generator) -> pd.DataFrame:
        """Events of ``users`` (``lengths[u]`` each, starting at ``first_time[u]``), in
        ``EVENT_COLUMNS`` and ``EVENT_DTYPES``. Events are held as flat arrays ordered by
        user then position, so event ``e - 1`` is the previous event of the same user."""
        items = self._items_through(batch)
        n_cat = len(CATEGORIES)
        n_events = int(lengths.sum())
        user_of = np.repeat(np.arange(len(lengths)), lengths)
        user_start = np.cumsum(lengths) - lengths
        position = np.arange(n_events) - user_start[user_of]

        # Sessions and timestamps. Gaps inside a session are seconds to minutes; gaps between
        # sessions are scaled so each user's history fits inside the batch's window.
        new_session = (position == 0) | (rng.random(n_events) < P_NEW_SESSION)
        session_number = _segment_cumsum(new_session.astype(np.int64), user_start, user_of) - 1
        in_gap = np.where(new_session, 0.0, IN_SESSION_GAP_MIN_S + rng.exponential(IN_SESSION_GAP_MEAN_S, n_events))
        between_gap = np.where(new_session & (position > 0), rng.exponential(1.0, n_events), 0.0)
        room = np.maximum(window_end - 1 - first_time - np.bincount(user_of, in_gap, len(lengths)), 0.0)
        room *= rng.uniform(*ACTIVE_SPAN_RANGE, len(lengths))
        between_total = np.bincount(user_of, between_gap, len(lengths))
        scale = np.divide(room, between_total, out=np.zeros_like(room), where=between_total > 0)
        offset = _segment_cumsum(in_gap + between_gap * scale[user_of], user_start, user_of)
        timestamp = np.minimum(np.floor(first_time[user_of] + offset), window_end - 1).astype(np.int64)

        # Which category each event browses: sticky within a session, otherwise drawn from the
        # user's current taste (drifting from early to late since they joined), or explored.
        drift = np.clip((timestamp - users.join_time[user_of]) / (DRIFT_DAYS * 86_400), 0.0, 1.0)[:, None]
        taste = (1 - drift) * users.early_taste[user_of] + drift * users.late_taste[user_of]
        switches = new_session | (rng.random(n_events) > P_STAY_IN_CATEGORY)
        drawn = _sample_rows((1 - P_EXPLORE) * taste + P_EXPLORE / n_cat, rng.random(n_events))
        category = drawn[np.maximum.accumulate(np.where(switches, np.arange(n_events), 0))]

        # Which item: mostly a fresh pick from the category by the user's preference; when the
        # user stays in the category, often one of the previous item's nearest neighbours.
        overlap = users.tags @ items.tags.T
        boost = np.where(items.arrival > 0, NEW_ITEM_BOOST * 0.5 ** (batch - items.arrival), 0.0)
        preference = (TAG_WEIGHT * overlap + STYLE_WEIGHT * (users.style @ items.style.T)
                      + POPULARITY_WEIGHT * items.log_popularity + boost)
        item = _sample_within_category(preference, items.category, n_cat, user_of, category, rng.random(n_events))
        follows = ~switches & (rng.random(n_events) < P_FOLLOW_SIMILAR)
        _follow_neighbours(item, follows, position, user_of, preference, _neighbours(items), rng)

        # Event type and value from how much the user likes the item.
        in_taste = taste[np.arange(n_events), category]
        shared = np.minimum(overlap[user_of, item], 3)
        logit = (LIKING_BIAS + LIKING_IN_TASTE * (in_taste > 0) + LIKING_CATEGORY_WEIGHT * in_taste
                 + LIKING_TAG * shared + rng.normal(0, LIKING_NOISE, n_events))
        liking = 1 / (1 + np.exp(-logit))
        mixture = liking[:, None] * EVENT_MIX_LIKED + (1 - liking[:, None]) * EVENT_MIX_DISLIKED
        event_type = _sample_rows(mixture, rng.random(n_events))
        event_name = np.array(EVENT_TYPES, dtype=object)[event_type]
        value = np.full(n_events, np.nan)
        is_rating, is_view, is_click = (event_name == "rating"), (event_name == "view"), (event_name == "click")
        stars = np.round(2 * (1.0 + 4.0 * liking + rng.normal(0, 0.5, n_events))) / 2
        value[is_rating] = np.clip(stars, *RATING_RANGE)[is_rating]
        view_dwell = np.exp(rng.normal(2.6 + 1.2 * liking, 0.5))
        click_dwell = np.exp(rng.normal(3.4 + 1.2 * liking, 0.6))
        value[is_view] = np.round(view_dwell[is_view], 1)
        value[is_click] = np.round(click_dwell[is_click], 1)
        text = np.full(n_events, None, dtype=object)
        for e in np.flatnonzero(event_name == "review"):
            text[e] = _review(items, item[e], liking[e], rng.random())

        user_ids = np.array([_user_id(i) for i in users.index], dtype=object)[user_of]
        frame = pd.DataFrame({
            "user_id": user_ids,
            "item_id": items.ids[item],
            "event_type": event_name,
            "value": value,
            "timestamp": timestamp,
            "session_id": [f"{u}-b{batch:03d}-s{s:03d}" for u, s in zip(user_ids, session_number)],
            "text": text,
        })
        frame = frame.astype(EVENT_DTYPES)[EVENT_COLUMNS]
        # A log in time order; the stable sort keeps each user's own order among equal stamps.
        return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def next_batch_index(landing_zone: Path | str) -> int:
    """One past the highest batch number under ``<landing_zone>/events/`` (0 if none)."""
    folder = Path(landing_zone) / "events"
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _EVENTS_FILE.fullmatch(p.name))]
    return max(numbers, default=-1) + 1


def _check_batch(batch: int) -> None:
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")


def _item_id(index: int) -> str:
    return f"i{index:05d}"


def _user_id(index: int) -> str:
    return f"u{index:05d}"


def _empty_catalog() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="string") for c in CATALOG_COLUMNS})
    frame["tags"] = frame["tags"].astype(object)
    return frame


def _pick(options: tuple[str, ...], u: float) -> str:
    """The option a uniform number in [0, 1) points at."""
    return options[int(u * len(options))]


def _title(cat: Category, u: np.ndarray) -> str:
    noun = int(u[2] * len(cat.nouns))
    extra = int(u[4] * len(cat.extras))
    title = _pick(cat.title_patterns, u[0]).format(
        adj=_pick(cat.adjectives, u[1]),
        noun=cat.nouns[noun],
        noun2=cat.nouns[(noun + 1 + int(u[3] * (len(cat.nouns) - 1))) % len(cat.nouns)],
        extra=cat.extras[extra],
        extra2=cat.extras[(extra + 1 + int(u[3] * (len(cat.extras) - 1))) % len(cat.extras)],
    )
    return title[0].upper() + title[1:]  # "the Vikings and ..." starts a title


def _description(cat: Category, themes: list[str], u: np.ndarray) -> str:
    mood = _pick(cat.moods, u[6])
    article = "An" if mood[0] in "aeiou" else "A"
    words = {"A_mood": f"{article} {mood}", "mood": mood, "kind": cat.kind, "audience": cat.audience,
             "t1": themes[0], "t2": themes[1], "t3": themes[2]}
    sentence = _pick(DESCRIPTION_OPENERS, u[7]).format(**words)
    if u[12] < 0.6:  # a second sentence for ~60% of items
        sentence += " " + _pick(DESCRIPTION_CLOSERS, u[13]).format(**words)
    return sentence


def _review(items: _Items, item: int, liking: float, u: float) -> str:
    templates = POSITIVE_REVIEWS if liking >= 0.5 else NEGATIVE_REVIEWS
    kind = CATEGORIES[items.category[item]].kind
    return _pick(templates, u).format(kind=kind, theme=items.lead_theme[item])


def _sample_rows(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """One column index per row, drawn proportionally to that row's non-negative weights."""
    cumulative = np.cumsum(weights, axis=1)
    hits = (uniforms * cumulative[:, -1])[:, None] >= cumulative
    return np.minimum(hits.sum(axis=1), weights.shape[1] - 1)


def _segment_cumsum(values: np.ndarray, starts: np.ndarray, segment_of: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each segment (segments contiguous, starting at ``starts``)."""
    total = np.cumsum(values)
    return total - (total[starts] - values[starts])[segment_of]


def _sample_within_category(log_weight: np.ndarray, item_category: np.ndarray, n_categories: int,
                            rows: np.ndarray, categories: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """For each query ``(rows[q], categories[q])`` draw an item of that category with
    probability proportional to ``exp(log_weight[row, item])``.

    All queries are answered by one binary search: the columns are grouped by category, each
    (row, category) segment's cumulative distribution is normalised to (0, 1] and shifted by
    ``row * n_categories + category``, which makes the whole flattened matrix sorted.
    Every category must have at least one item."""
    n_rows, n_cols = log_weight.shape
    order = np.argsort(item_category, kind="stable")
    sorted_category = item_category[order]
    counts = np.bincount(item_category, minlength=n_categories)
    ends = np.cumsum(counts)
    starts = ends - counts

    cdf = log_weight[:, order]
    cdf -= cdf.max(axis=1, keepdims=True)
    np.exp(cdf, out=cdf)
    np.cumsum(cdf, axis=1, out=cdf)
    before = np.where(starts > 0, cdf[:, np.maximum(starts - 1, 0)], 0.0)
    total = cdf[:, ends - 1] - before
    cdf -= before[:, sorted_category]
    cdf /= total[:, sorted_category]
    cdf[:, ends - 1] = 1.0
    cdf += (np.arange(n_rows) * n_categories)[:, None]
    cdf += sorted_category
    hits = np.searchsorted(cdf.ravel(), rows * n_categories + categories + uniforms, side="right")
    return order[hits % n_cols]


def _neighbours(items: _Items) -> np.ndarray:
    """(n_items, N_NEIGHBOURS) indices of each item's most similar items in its category:
    tag cosine plus ``NEIGHBOUR_STYLE_WEIGHT`` times style cosine. Categories with fewer
    items repeat neighbours; an item alone in its category is its own neighbour."""
    result = np.zeros((len(items.ids), N_NEIGHBOURS), dtype=np.int64)
    unit_tags = items.tags / np.linalg.norm(items.tags, axis=1, keepdims=True)
    for c in range(len(CATEGORIES)):
        members = np.flatnonzero(items.category == c)
        similarity = unit_tags[members] @ unit_tags[members].T
        similarity += NEIGHBOUR_STYLE_WEIGHT * (items.style[members] @ items.style[members].T)
        if len(members) > 1:
            np.fill_diagonal(similarity, -np.inf)
        k = min(N_NEIGHBOURS, max(len(members) - 1, 1))
        nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        result[members] = members[nearest[:, np.arange(N_NEIGHBOURS) % k]]
    return result


def _follow_neighbours(item: np.ndarray, follows: np.ndarray, position: np.ndarray, user_of: np.ndarray,
                       preference: np.ndarray, neighbours: np.ndarray, rng: np.random.Generator) -> None:
    """Replace ``item[e]`` for every following event by the neighbour of ``item[e - 1]`` the
    user prefers most (preference plus Gumbel noise, i.e. a softmax draw). Done position by
    position so chains of follows see their already updated predecessor."""
    followers = np.flatnonzero(follows)
    followers = followers[np.argsort(position[followers], kind="stable")]
    noise = rng.gumbel(size=(len(followers), neighbours.shape[1]))
    boundaries = np.flatnonzero(np.diff(position[followers])) + 1
    for chunk in np.split(np.arange(len(followers)), boundaries):
        events = followers[chunk]
        candidates = neighbours[item[events - 1]]
        scores = preference[user_of[events][:, None], candidates] + noise[chunk]
        item[events] = candidates[np.arange(len(events)), scores.argmax(axis=1)]


def _to_jsonl(frame: pd.DataFrame) -> str:
    """JSON Lines, one object per row; missing values become null."""
    return frame.to_json(orient="records", lines=True, force_ascii=False)


def _write_if_changed(path: Path, content: str) -> Path:
    """Write ``content`` to ``path`` atomically (hidden temp file in the same folder, then
    ``os.replace``), unless the file already holds exactly this content."""
    data = content.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return path
    return write_bytes_atomic(path, data)
