"""Writes examples/station_log.txt: a long logbook (about 2,250 tokens with SmolLM2's chat template) with a question at the end.

The document is generated (seeded) so that it is ours and reproducible: daily entries of a fictional
weather station, one of which records the fact the question asks about.
"""

import random
from pathlib import Path

rng = random.Random(2026)
observers = ["Ines", "Tomas", "Priya", "Olek", "Mara", "Jun", "Delia", "Ravi"]
skies = ["clear", "overcast", "hazy", "broken cloud", "light drizzle", "fog until noon", "high cirrus"]
winds = ["calm", "a light northerly", "a gusty westerly", "a steady southerly", "variable breezes"]
chores = ["recalibrated the barometer", "cleaned the rain gauge funnel", "replaced a cracked thermometer",
          "oiled the anemometer bearings", "re-painted the instrument shelter", "checked the solar panel wiring",
          "logged a visit from the supply boat", "trimmed the grass around the enclosure",
          "repaired the gate latch", "archived last month's charts"]
lines = ["Logbook of the Skerry Point weather station, spring season.", ""]
for day in range(1, 41):
    who = rng.choice(observers)
    t_min, t_max = rng.randint(-2, 8), rng.randint(9, 19)
    entry = (f"Day {day}. Observer: {who}. Sky {rng.choice(skies)}, wind {rng.choice(winds)}. "
             f"Temperature between {t_min} and {t_max} degrees, pressure {rng.randint(985, 1032)} hPa, "
             f"rainfall {rng.randint(0, 23)} mm. {who} {rng.choice(chores)}.")
    if day == 23:
        entry += (" During the afternoon a lost homing pigeon landed on the mast; its leg ring read "
                  "SKP-7319, and Mara kept it in the shed until the owner collected it two days later.")
    lines.append(entry)
lines += ["", "What was written on the leg ring of the homing pigeon? Reply with the ring code only."]
Path(__file__).resolve().parent.parent.joinpath("examples", "station_log.txt").write_text("\n".join(lines) + "\n")
