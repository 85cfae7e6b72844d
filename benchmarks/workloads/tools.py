"""The ``agentic-tools`` workload: structured tool calls under one long, shared system prompt.

Every request carries the same system prompt: instructions plus the JSON schemas of seven tools
(weather, calendar, flights, orders, currency, e-mail, reminders). User messages come from
templates with varied slots; the answer (``reference``) is exactly one JSON tool call, written
canonically (``json.dumps`` defaults, arguments in schema order), so answers share most of their
tokens across requests. A session is one simulated user making 3-6 calls in a row: each turn's
messages hold the earlier turns, with the reference calls as the assistant's answers, so names,
cities and contacts recur within a session. All text here is written for specjax; no data is read.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.workloads.base import Request, rng_for, take, token_budget

_DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "description": "Date as YYYY-MM-DD."}
_TIME = {"type": "string", "pattern": r"^\d{2}:\d{2}$", "description": "24-hour time as HH:MM."}
_EMAIL = {"type": "string", "pattern": r"^[a-z.]+@[a-z.]+$"}


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required,
                           "additionalProperties": False}}


TOOLS: list[dict] = [
    _tool("get_weather", "Current weather and forecast for a city.", {
        "city": {"type": "string", "description": "City name, e.g. \"Lisbon\"."},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                 "description": "Temperature unit; default celsius."},
        "days": {"type": "integer", "minimum": 1, "maximum": 7, "description": "Forecast length in days; default 1."},
    }, ["city"]),
    _tool("create_event", "Create an event in the user's calendar.", {
        "title": {"type": "string", "description": "Short title of the event."},
        "date": _DATE,
        "start_time": _TIME,
        "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480, "description": "Default 30."},
        "attendees": {"type": "array", "items": _EMAIL, "minItems": 1, "description": "E-mail addresses to invite."},
    }, ["title", "date", "start_time"]),
    _tool("search_flights", "Search one-way flights.", {
        "origin": {"type": "string", "pattern": r"^[A-Z]{3}$", "description": "IATA code of the departure airport."},
        "destination": {"type": "string", "pattern": r"^[A-Z]{3}$", "description": "IATA code of the arrival airport."},
        "date": _DATE,
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9, "description": "Default 1."},
        "cabin": {"type": "string", "enum": ["economy", "premium_economy", "business", "first"],
                  "description": "Default economy."},
    }, ["origin", "destination", "date"]),
    _tool("query_orders", "Look up a customer's orders in the shop database.", {
        "customer_id": {"type": "string", "pattern": r"^C-\d{5}$", "description": "Customer id, e.g. \"C-01234\"."},
        "status": {"type": "string", "enum": ["pending", "shipped", "delivered", "cancelled"],
                   "description": "Only orders with this status; default all."},
        "limit": {"type": "integer", "minimum": 1, "maximum": 100, "description": "Most recent N orders; default 10."},
    }, ["customer_id"]),
    _tool("convert_currency", "Convert an amount of money between currencies at today's rate.", {
        "amount": {"type": "number", "minimum": 0},
        "from_currency": {"type": "string", "pattern": r"^[A-Z]{3}$", "description": "ISO 4217 code."},
        "to_currency": {"type": "string", "pattern": r"^[A-Z]{3}$", "description": "ISO 4217 code."},
    }, ["amount", "from_currency", "to_currency"]),
    _tool("send_email", "Send an e-mail from the user's account.", {
        "to": {"type": "array", "items": _EMAIL, "minItems": 1},
        "subject": {"type": "string"},
        "body": {"type": "string"},
    }, ["to", "subject", "body"]),
    _tool("set_reminder", "Remind the user of something at a given date and time.", {
        "text": {"type": "string", "description": "What to remind the user of."},
        "date": _DATE,
        "time": _TIME,
    }, ["text", "date", "time"]),
]
TOOLS_BY_NAME = {tool["name"]: tool for tool in TOOLS}

SYSTEM_PROMPT = (
    "You are the function-calling assistant of a productivity app. You can use the tools described "
    "below by their JSON schemas. Answer every user message with exactly one tool call and nothing else: "
    "one JSON object of the form {\"name\": <tool name>, \"arguments\": {<argument>: <value>, ...}}, "
    "on one line, with the arguments in the order the schema lists them.\n\n"
    "Rules:\n"
    "- Include every required argument. Include an optional argument only when the user states its value.\n"
    "- Dates are YYYY-MM-DD and times are 24-hour HH:MM. The current year is 2026.\n"
    "- Airports are IATA codes and currencies ISO 4217 codes, in upper case.\n"
    "- E-mail addresses are written exactly as the user gives them.\n"
    "- Never add explanations, comments or Markdown around the JSON.\n\n"
    "Tools:\n" + json.dumps(TOOLS, indent=2) + "\n"
)

# ---------------------------------------------------------------------------- slot values
_CITIES = [("Lisbon", "LIS"), ("Toronto", "YYZ"), ("Nairobi", "NBO"), ("Osaka", "KIX"), ("Denver", "DEN"),
           ("Madrid", "MAD"), ("Seoul", "ICN"), ("Oslo", "OSL"), ("Chicago", "ORD"), ("Sydney", "SYD"),
           ("Cairo", "CAI"), ("Lima", "LIM"), ("Dublin", "DUB"), ("Vienna", "VIE"), ("Singapore", "SIN"),
           ("Boston", "BOS"), ("Reykjavik", "KEF"), ("Montreal", "YUL"), ("Athens", "ATH"), ("Bangkok", "BKK")]
_FIRST_NAMES = ["Ana", "Ben", "Chen", "Dara", "Elif", "Femi", "Greta", "Hiro", "Ines", "Jonas", "Kavya", "Liam",
                "Maya", "Nils", "Omar", "Priya", "Rosa", "Sami", "Tariq", "Uma", "Vera", "Yusuf", "Zoe"]
_LAST_NAMES = ["Alves", "Brandt", "Costa", "Diaz", "Eriksen", "Fischer", "Garcia", "Hughes", "Ito", "Jensen",
               "Kim", "Larsen", "Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi", "Singh", "Tanaka"]
_DOMAINS = ["example.com", "example.org", "acme.test", "northwind.test"]
_CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CAD", "CHF", "AUD", "SEK", "INR", "BRL"]
_EVENT_TITLES = ["Design review", "Quarterly planning", "Budget sync", "Team lunch", "Project kickoff",
                 "Interview debrief", "Dentist appointment", "Release retrospective", "Customer call",
                 "Roadmap workshop"]
_REMINDERS = ["call the landlord", "renew the passport", "water the plants", "pay the electricity bill",
              "book a table for Friday", "send the invoice", "pick up the dry cleaning", "back up the laptop",
              "submit the expense report", "buy a birthday gift"]
_SUBJECTS = ["Meeting notes", "Quick question", "Schedule change", "Draft for review", "Travel plans",
             "Invoice attached", "Thanks", "Agenda for tomorrow"]
_BODIES = ["Please find the notes from today's meeting below.", "Could you review the draft by Thursday?",
           "I need to move our call to next week.", "Thanks for your help with the release.",
           "Here is the agenda for tomorrow's meeting.", "Let me know if the new time works for you.",
           "The invoice for last month is attached.", "I will be travelling next week and offline."]
_CABINS = {"economy": "economy", "premium economy": "premium_economy", "business class": "business",
           "first class": "first"}
_STATUSES = ["pending", "shipped", "delivered", "cancelled"]


class _Persona:
    """The user of one session: the contacts, cities and ids their requests draw on."""

    def __init__(self, rng: random.Random):
        self.home = rng.choice(_CITIES)
        self.cities = rng.sample([c for c in _CITIES if c != self.home], 4)
        self.contacts = []
        for first in rng.sample(_FIRST_NAMES, 3):
            last = rng.choice(_LAST_NAMES)
            self.contacts.append((first, f"{first.lower()}.{last.lower()}@{rng.choice(_DOMAINS)}"))
        self.customer_id = f"C-{rng.randrange(100000):05d}"
        self.currency = rng.choice(_CURRENCIES)


def _date(rng: random.Random) -> tuple[str, str]:
    """(how the user says it, YYYY-MM-DD) for a day in 2026."""
    day = dt.date(2026, 1, 1) + dt.timedelta(days=rng.randrange(365))
    spoken = rng.choice([day.isoformat(), f"{day:%B} {day.day}", f"{day.day} {day:%B}", f"{day:%B} {day.day}, 2026"])
    return spoken, day.isoformat()


def _time(rng: random.Random) -> tuple[str, str]:
    """(how the user says it, HH:MM) for a time on the quarter hour between 07:00 and 19:45."""
    hour, minute = rng.randrange(7, 20), rng.choice([0, 0, 15, 30, 45])
    twelve = f"{(hour - 1) % 12 + 1}{'' if minute == 0 else f':{minute:02d}'} {'am' if hour < 12 else 'pm'}"
    return rng.choice([twelve, f"{hour:02d}:{minute:02d}"]), f"{hour:02d}:{minute:02d}"


# ---------------------------------------------------------------------------- requests per tool
def _weather(rng: random.Random, p: _Persona) -> tuple[str, dict]:
    city = rng.choice([p.home] + p.cities)[0]
    args: dict[str, Any] = {"city": city}
    unit = rng.choice([None, None, "celsius", "fahrenheit"])
    days = rng.choice([None, None, 3, 5, 7])
    if unit:
        args["unit"] = unit
    if days:
        args["days"] = days
    what = f"the {days}-day forecast" if days else rng.choice(["the weather", "the current weather"])
    text = rng.choice([f"What's {what} in {city}", f"Can you get me {what} for {city}", f"Check {what} in {city}"])
    return text + (f" in {unit.capitalize()}" if unit else "") + "?", args


def _event(rng: random.Random, p: _Persona) -> tuple[str, dict]:
    title = rng.choice(_EVENT_TITLES)
    spoken_day, day = _date(rng)
    spoken_time, time = _time(rng)
    args: dict[str, Any] = {"title": title, "date": day, "start_time": time}
    text = f"Put \"{title}\" in my calendar on {spoken_day} at {spoken_time}"
    if rng.random() < 0.6:
        args["duration_minutes"] = minutes = rng.choice([15, 30, 45, 60, 90, 120])
        text += f" for {minutes} minutes"
    if rng.random() < 0.6:
        invited = rng.sample(p.contacts, rng.randint(1, 2))
        args["attendees"] = [email for _, email in invited]
        text += " and invite " + " and ".join(f"{name} ({email})" for name, email in invited)
    return text + ".", args


def _flights(rng: random.Random, p: _Persona) -> tuple[str, dict]:
    (origin_city, origin), (dest_city, dest) = (p.home, rng.choice(p.cities)) if rng.random() < 0.7 else \
        rng.sample(p.cities, 2)
    spoken_day, day = _date(rng)
    args: dict[str, Any] = {"origin": origin, "destination": dest, "date": day}
    text = rng.choice([f"Find flights from {origin_city} ({origin}) to {dest_city} ({dest}) on {spoken_day}",
                       f"Search for a flight {origin} to {dest} on {spoken_day}"])
    if rng.random() < 0.5:
        args["passengers"] = passengers = rng.randint(2, 4)
        text += f" for {passengers} people"
    if rng.random() < 0.4:
        spoken_cabin = rng.choice(list(_CABINS))
        args["cabin"] = _CABINS[spoken_cabin]
        text += f", {spoken_cabin}"
    return text + ".", args


def _orders(rng: random.Random, p: _Persona) -> tuple[str, dict]:
    args: dict[str, Any] = {"customer_id": p.customer_id}
    status = rng.choice([None, *_STATUSES])
    limit = rng.choice([None, 5, 10, 20])
    if status:
        args["status"] = status
    if limit:
        args["limit"] = limit
    what = ("last " if limit else "") + (f"{limit} " if limit else "") + (f"{status} " if status else "") + "orders"
    return rng.choice([f"Show the {what} for customer {p.customer_id}.",
                       f"Look up the {what} of customer {p.customer_id}, please."]), args


def _currency(rng: random.Random, p: _Persona) -> tuple[str, dict]:
    source, target = (p.currency, rng.choice([c for c in _CURRENCIES if c != p.currency])) if rng.random() < 0.6 \
        else rng.sample(_CURRENCIES, 2)
    amount: int | float = rng.choice([rng.randrange(5, 2000), round(rng.uniform(1, 500), 2)])
    args = {"amount": amount, "from_currency": source, "to_currency": target}
    return rng.choice([f"How much is {amount} {source} in {target}?", f"Convert {amount} {source} to {target}."]), args


def _email(rng: random.Random, p: _Persona) -> tuple[str, dict]:
    invited = rng.sample(p.contacts, rng.randint(1, 2))
    subject, body = rng.choice(_SUBJECTS), rng.choice(_BODIES)
    args = {"to": [email for _, email in invited], "subject": subject, "body": body}
    names = " and ".join(f"{name} <{email}>" for name, email in invited)
    return f"Email {names} with the subject \"{subject}\" and this text: {body}", args


def _reminder(rng: random.Random, p: _Persona) -> tuple[str, dict]:
    what = rng.choice(_REMINDERS)
    spoken_day, day = _date(rng)
    spoken_time, time = _time(rng)
    args = {"text": what, "date": day, "time": time}
    return rng.choice([f"Remind me to {what} on {spoken_day} at {spoken_time}.",
                       f"Set a reminder for {spoken_day}, {spoken_time}: {what}."]), args


_GENERATORS: dict[str, Callable[[random.Random, _Persona], tuple[str, dict]]] = {
    "get_weather": _weather, "create_event": _event, "search_flights": _flights, "query_orders": _orders,
    "convert_currency": _currency, "send_email": _email, "set_reminder": _reminder,
}


def tool_call(name: str, arguments: dict) -> str:
    """The canonical JSON text of a call: ``{"name": ..., "arguments": {...}}``, arguments in schema order."""
    order = list(TOOLS_BY_NAME[name]["parameters"]["properties"])
    ordered = {key: arguments[key] for key in sorted(arguments, key=order.index)}
    return json.dumps({"name": name, "arguments": ordered}, ensure_ascii=False)


# ---------------------------------------------------------------------------- checking a call
def _check(value: Any, schema: dict, where: str) -> list[str]:
    kind = schema.get("type")
    types = {"string": str, "integer": int, "number": (int, float), "array": list, "object": dict, "boolean": bool}
    if kind in types and (not isinstance(value, types[kind]) or (kind != "boolean" and isinstance(value, bool))):
        return [f"{where}: expected {kind}, got {type(value).__name__}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{where}: {value} > {schema['maximum']}")
    if kind == "array":
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            errors += _check(item, schema.get("items", {}), f"{where}[{i}]")
    if kind == "object":
        properties = schema.get("properties", {})
        errors += [f"{where}: missing {key!r}" for key in schema.get("required", []) if key not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{where}: unexpected {key!r}" for key in value if key not in properties]
        for key, item in value.items():
            if key in properties:
                errors += _check(item, properties[key], f"{where}.{key}")
    return errors


def validate_call(text: str) -> list[str]:
    """Problems with a tool call's JSON text against :data:`TOOLS` (empty when it is valid)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"not JSON: {e}"]
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return ["expected an object with exactly the keys 'name' and 'arguments'"]
    if call["name"] not in TOOLS_BY_NAME:
        return [f"unknown tool {call['name']!r}"]
    return _check(call["arguments"], TOOLS_BY_NAME[call["name"]]["parameters"], "arguments")


# ---------------------------------------------------------------------------- the workload
def tool_sessions(seed: int = 0) -> Iterator[list[Request]]:
    """Sessions without end, one simulated user each."""
    index = 0
    while True:
        rng = rng_for("agentic-tools", seed, index)
        persona = _Persona(rng)
        session = f"agentic-tools/s{seed}/{index:04d}"
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        requests = []
        for turn in range(rng.randint(3, 6)):
            name = rng.choice(list(_GENERATORS))
            text, arguments = _GENERATORS[name](rng, persona)
            messages = messages + [{"role": "user", "content": text}]
            reference = tool_call(name, arguments)
            requests.append(Request(id=f"{session}/{turn}", workload="agentic-tools",
                                    messages=[dict(m) for m in messages], session=session, turn=turn,
                                    reference=reference,
                                    max_tokens=token_budget(reference, 2.0, 16), meta={"tool": name}))
            messages = messages + [{"role": "assistant", "content": reference}]
        index += 1
        yield requests


def tool_workload(n: int | None = 160, seed: int = 0) -> list[Request]:
    """``n`` requests: sessions of 3-6 tool calls each, in order (the last session may be cut short)."""
    return take((r for session in tool_sessions(seed) for r in session), 160 if n is None else n)
