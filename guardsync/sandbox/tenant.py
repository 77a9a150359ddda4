"""An Entra ID tenant held in memory, and a generator of plausible ones.

No HTTP here: the Graph emulator serves a Tenant, tests and the demo mutate it.
Objects are plain dicts shaped as Graph returns them, so the emulator can serve
them as they are and a tenant of 100,000 users stays cheap.

Mutators replace a user's dict rather than editing it, so a page the emulator
already snapshotted keeps showing what it showed.

Every mutator also appends to `changes`, the tenant's change log: entry n (0-based)
has sequence number n + 1, and `sequence` is the number of the latest. The Graph
emulator's delta links carry the sequence number they were issued at, and
`changes_since(n)` reads only the entries after it (a list slice: no scan of the
tenant), so a delta round with few changes stays cheap at any tenant size.
Generation writes the dicts directly and logs nothing: a tenant starts with an empty
log, and the first delta round reads its whole state anyway.
"""

from __future__ import annotations

import random
import string
import threading
import uuid
from dataclasses import dataclass, field

from guardsync.models import USER_COLUMNS

USER_KEYS = tuple(USER_COLUMNS)  # the Graph user fields every sandbox user dict holds
# Graph v1.0 user properties a list or delta round can $select (learn.microsoft.com/graph/api/resources/user);
# the sandbox's users carry the ones marked * (see _add_profiles), the rest read as null.
GRAPH_USER_PROPERTIES = USER_KEYS + (
    "preferredLanguage", "businessPhones", "mobilePhone", "department", "companyName", "officeLocation",  # *
    "employeeId", "onPremisesExtensionAttributes", "city", "country",  # *
    "ageGroup", "createdDateTime", "creationType", "employeeHireDate", "employeeLeaveDateTime", "employeeType",
    "externalUserState", "faxNumber", "imAddresses", "isResourceAccount", "legalAgeGroupClassification",
    "mailNickname", "onPremisesDistinguishedName", "onPremisesDomainName", "onPremisesImmutableId",
    "onPremisesSamAccountName", "onPremisesSecurityIdentifier", "onPremisesSyncEnabled",
    "onPremisesUserPrincipalName", "otherMails", "passwordPolicies", "postalCode", "proxyAddresses",
    "showInAddressList", "state", "streetAddress", "usageLocation",
)
# Returned only when reading one user: a list or delta $select of them fails (see the emulator).
SINGLE_USER_PROPERTIES = ("aboutMe", "birthday", "hireDate", "interests", "mailboxSettings", "mySite", "pastProjects",
                          "preferredName", "responsibilities", "schools", "skills")
# Properties whose read needs an application permission beyond User.Read.All.
PROPERTY_PERMISSIONS = {"employeeLeaveDateTime": "User-LifeCycleInfo.Read.All"}
EXTENSION_ATTRIBUTES = tuple(f"extensionAttribute{n}" for n in range(1, 16))
DIRECTORY_EXTENSIONS = ("costCenter", "timeZone")  # registered by the tenant's HR app (extension_<appId>_<name>)
LANGUAGES = ("en-US", "en-GB", "de-DE", "fr-FR", "pt-BR", "ja-JP", "es-ES", "nl-NL", None)
COMPANIES = ("Contoso Ltd", "Contoso Consulting", "Fabrikam Inc", None)
OFFICES = ("Berlin", "London", "Seattle", "Tokyo", "Remote", None)
TIME_ZONES = ("Europe/Berlin", "Europe/London", "America/Los_Angeles", "Asia/Tokyo", None)
OTHER_TYPES = ("device", "servicePrincipal", "orgContact")
# Kinds of change-log entries: (kind, object id, detail).
USER_CHANGED = "user"  # detail: the user properties written (a new user: those with a value); deletion: ()
GROUP_CHANGED = "group"  # detail: None (created, renamed or deleted: the current state tells which)
MEMBER_CHANGED = "member"  # object id: the group; detail: (member id, member type, True added / False removed)
UNVERIFIED_DOMAIN = "partner.example"  # users carry it, the tenant never verified it

FIRST_NAMES = (
    "Adele Alex Allan Amara Ana Anders Ben Bianca Carlos Chen Chloe Dmitri Diego Elena Emil Emma Farah "
    "Fatima Felix Grace Hana Hugo Ines Isaac Ivan Jana Javier Jin Johanna Jonas Kai Keiko Lars Laura Lea "
    "Lena Liam Lucia Malik Maria Mateo Mei Megan Mohammed Nadia Nia Noah Olga Omar Oscar Pablo Priya Rafael "
    "Raj Rosa Sara Sofia Stefan Tariq Tomas Uma Valentina Victor Wei Yara Yusuf Zoe"
).split()
LAST_NAMES = (
    "Abbott Adeyemi Andersen Bauer Becker Chen Costa Dubois Eriksson Fischer Garcia Gonzalez Hansen Hoffmann "
    "Ivanova Jensen Kim Kowalski Larsen Lee Lopez Martin Meyer Moreau Muller Nakamura Nguyen Novak Okafor "
    "Olsen Patel Petrov Quinn Rossi Santos Schmidt Silva Singh Smith Tanaka Taylor Varga Wagner Walsh Weber "
    "Williams Wong Yamamoto Zhang"
).split()
JOB_TITLES = (
    "Software Engineer",
    "Senior Software Engineer",
    "Engineering Manager",
    "Product Manager",
    "Product Designer",
    "Data Analyst",
    "Site Reliability Engineer",
    "Account Executive",
    "Sales Manager",
    "Customer Success Manager",
    "Support Engineer",
    "HR Business Partner",
    "Recruiter",
    "Financial Analyst",
    "Controller",
    "Marketing Manager",
    "Content Strategist",
    "Legal Counsel",
    "IT Administrator",
    "Security Analyst",
    "Office Manager",
    None,  # many tenants leave it empty for some users
)
DEPARTMENTS = (
    "Engineering Finance Sales Marketing Support Legal HR IT Security Product Design Data Operations "
    "Procurement Facilities Research Training Compliance Partnerships Communications"
).split()
TEAMS = (
    "All",
    "Leads",
    "EMEA",
    "Americas",
    "APAC",
    "Berlin",
    "London",
    "Seattle",
    "Tokyo",
    "Contractors",
    "Onboarding",
    "Platform",
    "Tooling",
    "Readers",
    "Admins",
    "Interns",
    "Oncall",
    "Guild",
    "Committee",
    "Project Phoenix",
)


def _new_id(rng: random.Random) -> str:
    """A uuid4 drawn from a seeded generator, so a tenant is reproducible."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass
class Tenant:
    tenant_id: str
    organization: str
    initial_domain: str
    domains: list[dict]
    users: dict[str, dict] = field(default_factory=dict)
    groups: dict[str, dict] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)  # group id -> direct member ids, in order
    others: dict[str, str] = field(default_factory=dict)  # id -> "device" | "servicePrincipal" | "orgContact"
    client_id: str = ""
    client_secret: str = ""
    certificate_pem: bytes | None = None
    extension_app_id: str = "b7d3c1e0a9f84d2c9e6a5b4c3d2e1f00"  # the app owning the directory extensions (no dashes)
    changes: list[tuple] = field(default_factory=list, repr=False, compare=False)  # the change log, oldest first
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False, compare=False)

    # -- lookups -------------------------------------------------------------
    @property
    def verified_domains(self) -> list[str]:
        return [d["id"] for d in self.domains if d["isVerified"]]

    def type_of(self, object_id: str) -> str | None:
        """Graph type name of a directory object ("user", "group", ...), None if unknown."""
        if object_id in self.users:
            return "user"
        if object_id in self.groups:
            return "group"
        return self.others.get(object_id)

    @property
    def extension_properties(self) -> tuple[str, ...]:
        """The directory extensions registered for users, as Graph names them."""
        return tuple(f"extension_{self.extension_app_id}_{name}" for name in DIRECTORY_EXTENSIONS)

    @property
    def user_properties(self) -> frozenset[str]:
        """What a user dict may hold: Graph's user properties and this tenant's directory extensions."""
        return frozenset(GRAPH_USER_PROPERTIES) | frozenset(self.extension_properties)

    @property
    def sequence(self) -> int:
        """Sequence number of the latest change (0: none yet)."""
        return len(self.changes)

    def changes_since(self, sequence: int) -> tuple[dict[str, set[str]], dict[str, dict[str, tuple[str, bool]]]]:
        """What changed after `sequence`, in first-change order: O(changes since), never O(tenant).

        Returns (users, groups): users maps a user id to the properties written to it
        (empty for a deletion: the current state tells whether it still exists); groups
        maps a group id to its membership changes, member id -> (member type, added?),
        the last change of each member winning (a rename or deletion maps to {} unless
        members changed too). Hold `lock` while calling it and reading the state after.
        """
        if not 0 <= sequence <= len(self.changes):
            raise ValueError(f"sequence {sequence} is not in 0..{len(self.changes)}")
        users: dict[str, set[str]] = {}
        groups: dict[str, dict[str, tuple[str, bool]]] = {}
        for kind, object_id, detail in self.changes[sequence:]:
            if kind == USER_CHANGED:
                users.setdefault(object_id, set()).update(detail)
            elif kind == GROUP_CHANGED:
                groups.setdefault(object_id, {})
            else:
                member_id, member_type, added = detail
                groups.setdefault(object_id, {})[member_id] = (member_type, added)
        return users, groups

    def knows_tenant(self, name: str) -> bool:
        """Entra accepts the tenant GUID or any of its verified domains in an authority."""
        name = name.lower()
        return name == self.tenant_id.lower() or name in (d.lower() for d in self.verified_domains)

    # -- users ---------------------------------------------------------------
    def add_user(self, **fields) -> str:
        unknown = set(fields) - self.user_properties
        if unknown:
            raise ValueError(f"not Graph user properties: {sorted(unknown)}")
        if not fields.get("userPrincipalName"):
            raise ValueError("userPrincipalName is required")
        with self.lock:
            user = {key: None for key in USER_KEYS}
            user.update(accountEnabled=True, userType="Member")
            user["displayName"] = fields["userPrincipalName"].split("@")[0]
            user.update(fields)
            user["id"] = fields.get("id") or _new_id(self.rng)
            self.users[user["id"]] = user
            self.changes.append((USER_CHANGED, user["id"], tuple(key for key, value in user.items() if value is not None)))
            return user["id"]

    def update_user(self, user_id: str, **fields) -> None:
        unknown = set(fields) - (self.user_properties - {"id"})
        if unknown:
            raise ValueError(f"not updatable user properties: {sorted(unknown)}")
        with self.lock:
            self.users[user_id] = {**self.users[user_id], **fields}  # replace: snapshots keep the old dict
            self.changes.append((USER_CHANGED, user_id, tuple(fields)))

    def delete_user(self, user_id: str) -> None:
        with self.lock:
            del self.users[user_id]
            self._forget_member(user_id)
            self.changes.append((USER_CHANGED, user_id, ()))

    # -- groups and memberships ------------------------------------------------
    def add_group(self, name: str) -> str:
        with self.lock:
            group_id = _new_id(self.rng)
            self.groups[group_id] = {"id": group_id, "displayName": name}
            self.members[group_id] = []
            self.changes.append((GROUP_CHANGED, group_id, None))
            return group_id

    def rename_group(self, group_id: str, name: str) -> None:
        with self.lock:
            self.groups[group_id] = {**self.groups[group_id], "displayName": name}
            self.changes.append((GROUP_CHANGED, group_id, None))

    def delete_group(self, group_id: str) -> None:
        with self.lock:
            del self.groups[group_id]
            self.members.pop(group_id, None)
            self._forget_member(group_id)
            self.changes.append((GROUP_CHANGED, group_id, None))

    def add_member(self, group_id: str, member_id: str) -> None:
        with self.lock:
            if group_id not in self.groups:
                raise KeyError(f"no group {group_id}")
            if self.type_of(member_id) is None:
                raise KeyError(f"no directory object {member_id}")
            members = self.members.setdefault(group_id, [])
            if member_id not in members:
                members.append(member_id)
                self.changes.append((MEMBER_CHANGED, group_id, (member_id, self.type_of(member_id), True)))

    def remove_member(self, group_id: str, member_id: str) -> None:
        with self.lock:
            members = self.members.get(group_id, [])
            if member_id in members:
                members.remove(member_id)
                self.changes.append((MEMBER_CHANGED, group_id, (member_id, self.type_of(member_id), False)))

    def add_other(self, kind: str) -> str:
        """A device, service principal or contact: only ever seen as a group member."""
        if kind not in OTHER_TYPES:
            raise ValueError(f"kind must be one of {OTHER_TYPES}")
        with self.lock:
            object_id = _new_id(self.rng)
            self.others[object_id] = kind
            return object_id

    def _forget_member(self, object_id: str) -> None:
        """A deleted object leaves every group it was in. Not logged as membership changes: the
        deletion itself is the change (as in Graph, whose users delta reports the user @removed),
        so a delta reader must drop a removed object's memberships itself."""
        for members in self.members.values():
            if object_id in members:
                members.remove(object_id)


# -- generation ----------------------------------------------------------------

BAD_RECORD_COUNT = 3 + 3 + 2 + 1 + 2 + 2  # guests, disabled, case twins, bad mail, unverified, initial-only
MIN_NORMAL_USERS = 40  # room for the Pilot group and the fixed cast
PILOT_SIZE = 30


def generate_tenant(
    users: int = 300,
    groups: int = 20,
    memberships: int | None = None,
    depth: int = 3,
    seed: int = 7,
    domains: tuple[str, ...] = ("contoso.com", "fabrikam.com"),
    bad_records: bool = True,
) -> Tenant:
    """A plausible tenant; the same arguments give the same tenant.

    `users` counts every user (bad records included) and `memberships` is the target
    number of direct user memberships; both are raised to what the fixed cast needs
    (Pilot group, nesting chain, cycle) when given smaller.
    """
    rng = random.Random(seed)
    tenant = _empty_tenant(rng, list(domains), bad_records)
    normal_count = max(users - (BAD_RECORD_COUNT if bad_records else 0), MIN_NORMAL_USERS)
    normal = _add_normal_users(tenant, rng, normal_count, list(domains))
    bad = _add_bad_records(tenant, rng, normal, list(domains)) if bad_records else {}
    group_ids = _add_groups(tenant, max(groups, depth + 6))
    target = memberships if memberships is not None else 2 * len(normal)
    _fill_memberships(tenant, rng, group_ids, normal, bad, target, depth)
    tenant.rng = random.Random(rng.getrandbits(64))  # later ids: reproducible, distinct from these
    _add_profiles(tenant, random.Random(seed * 7919 + 13), bad_records)
    return tenant


def _add_profiles(tenant: Tenant, rng: random.Random, bad_records: bool) -> None:
    """The attributes Atlassian's own sync sends, and more to map: phones, department, company,
    on-premises extension attributes, directory extensions. An RNG of their own, so the users,
    groups and ids stay those the same seed gave before profiles existed. With bad records, a few
    values Atlassian would refuse (a language that is not a tag, a time zone that is no IANA name)."""
    cost_center, time_zone = tenant.extension_properties
    for n, user in enumerate(tenant.users.values()):
        extension_attributes = dict.fromkeys(EXTENSION_ATTRIBUTES)
        extension_attributes["extensionAttribute1"] = f"E{n:06d}" if rng.random() < 0.9 else None
        extension_attributes["extensionAttribute3"] = rng.choice(("Ava", "Sam", "Jo", "Kit", None))
        user.update(
            preferredLanguage=rng.choice(LANGUAGES),
            businessPhones=[f"+1 425 555 {n % 10000:04d}"] if rng.random() < 0.8 else [],
            mobilePhone=f"+44 7700 {n % 1000000:06d}" if rng.random() < 0.6 else None,
            department=rng.choice(DEPARTMENTS + [None]),
            companyName=rng.choice(COMPANIES),
            officeLocation=rng.choice(OFFICES),
            employeeId=f"{100000 + n}",
            onPremisesExtensionAttributes=extension_attributes,
            city=rng.choice(OFFICES),
            country=None,
        )
        user[cost_center] = f"CC-{rng.randint(100, 999)}" if rng.random() < 0.7 else None
        user[time_zone] = rng.choice(TIME_ZONES)
    if bad_records:  # refused values on users who otherwise sync
        plain = [u for u in tenant.users.values() if u["userType"] == "Member" and u["accountEnabled"]][10:13]
        for user, language in zip(plain, ("English", "en_US")):  # not the first users: those have case twins
            user["preferredLanguage"] = language
        plain[2][time_zone] = "CET+1"


def _empty_tenant(rng: random.Random, domains: list[str], bad_records: bool) -> Tenant:
    stem = domains[0].split(".")[0]
    initial = f"{stem}.onmicrosoft.com"
    domain_objects = [
        {"id": name, "isVerified": True, "isInitial": False, "isDefault": i == 0} for i, name in enumerate(domains)
    ]
    domain_objects.append({"id": initial, "isVerified": True, "isInitial": True, "isDefault": False})
    if bad_records:  # added but never verified: shows that only verified domains count
        domain_objects.append({"id": f"pending.{domains[0]}", "isVerified": False, "isInitial": False, "isDefault": False})
    secret_alphabet = string.ascii_letters + string.digits + "~._-"
    return Tenant(
        tenant_id=_new_id(rng),
        organization=f"{stem.capitalize()} Ltd",
        initial_domain=initial,
        domains=domain_objects,
        client_id=_new_id(rng),
        client_secret="".join(rng.choices(secret_alphabet, k=40)),
        rng=rng,
    )


def _user(rng: random.Random, upn: str, mail: str | None, given: str, surname: str, **extra) -> dict:
    user = {
        "id": _new_id(rng),
        "userPrincipalName": upn,
        "mail": mail,
        "displayName": f"{given} {surname}",
        "givenName": given,
        "surname": surname,
        "jobTitle": rng.choice(JOB_TITLES),
        "accountEnabled": True,
        "userType": "Member",
    }
    user.update(extra)
    return user


def _add_normal_users(tenant: Tenant, rng: random.Random, count: int, domains: list[str]) -> list[str]:
    """Members spread over the domains; UPN == mail for most, a few without mail or on another domain."""
    weights = [3] + [1] * (len(domains) - 1)  # the default domain holds most people
    taken: dict[str, int] = {}
    ids = []
    for _ in range(count):
        given, surname = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        domain = rng.choices(domains, weights)[0]
        local = _unique_local(taken, f"{given}.{surname}".lower(), domain)
        upn = f"{local}@{domain}"
        roll = rng.random()
        if roll < 0.03:
            mail = None  # no mailbox
        elif roll < 0.05 and len(domains) > 1:
            mail = f"{local}@{rng.choice([d for d in domains if d != domain])}"  # UPN and mail disagree
        else:
            mail = upn
        user = _user(rng, upn, mail, given, surname)
        tenant.users[user["id"]] = user
        ids.append(user["id"])
    return ids


def _unique_local(taken: dict[str, int], base: str, domain: str) -> str:
    key = f"{base}@{domain}"
    n = taken.get(key, 0)
    taken[key] = n + 1
    return base if n == 0 else f"{base}{n + 1}"


def _add_bad_records(tenant: Tenant, rng: random.Random, normal: list[str], domains: list[str]) -> dict[str, list[str]]:
    """The records a real tenant always has and a sync must survive, by kind."""
    initial, home = tenant.initial_domain, domains[0]
    made: dict[str, list[str]] = {}

    def add(kind: str, user: dict) -> None:
        tenant.users[user["id"]] = user
        made.setdefault(kind, []).append(user["id"])

    for given, surname, provider in (("Jane", "Doe", "gmail.com"), ("Raj", "Kumar", "outlook.com"), ("Li", "Wu", "yahoo.com")):
        local = f"{given}.{surname}".lower()
        upn = f"{local}_{provider}#EXT#@{initial}"
        add("guest", _user(rng, upn, f"{local}@{provider}", given, surname, userType="Guest"))
    for given, surname in (("Peter", "Gone"), ("Paula", "Left"), ("Sam", "Leaver")):
        upn = f"{given}.{surname}@{home}".lower()
        add("disabled", _user(rng, upn, upn, given, surname, accountEnabled=False))
    with_mail = (tenant.users[i] for i in normal if tenant.users[i]["mail"] == tenant.users[i]["userPrincipalName"])
    for original in (next(with_mail), next(with_mail)):  # twin both its UPN and its mail
        upn = _swap_case(original["userPrincipalName"])
        add("case_twin", _user(rng, upn, upn, original["givenName"], original["surname"]))
    add("bad_mail", _user(rng, f"no.mail@{home}", "not-an-address", "Noel", "Mailless"))
    for given, surname in (("Pat", "Partner"), ("Kim", "Vendor")):
        address = f"{given}.{surname}@{UNVERIFIED_DOMAIN}".lower()
        add("unverified_domain", _user(rng, address, address, given, surname))
    for given, surname in (("Admin", "Breakglass"), ("Svc", "Scanner")):
        address = f"{given}.{surname}@{initial}".lower()
        add("initial_domain_only", _user(rng, address, address, given, surname))
    return made


def _swap_case(address: str) -> str:
    """Same address, other letter case: 'anna.lee@x.com' -> 'Anna.Lee@X.COM'-like."""
    local, domain = address.split("@")
    return f"{local.title()}@{domain.upper()}"


def _add_groups(tenant: Tenant, count: int) -> list[str]:
    names = ["Pilot", "Pilot Champions"]
    combos = [f"{dept} {team}" for team in TEAMS for dept in DEPARTMENTS]
    for i in range(count - len(names)):
        base = combos[i % len(combos)]
        names.append(base if i < len(combos) else f"{base} {i // len(combos) + 1}")
    ids = []
    for name in names:
        group_id = _new_id(tenant.rng)
        tenant.groups[group_id] = {"id": group_id, "displayName": name}
        tenant.members[group_id] = []
        ids.append(group_id)
    return ids


def _fill_memberships(
    tenant: Tenant,
    rng: random.Random,
    group_ids: list[str],
    normal: list[str],
    bad: dict[str, list[str]],
    target: int,
    depth: int,
) -> None:
    pilot, champions, ordinary = group_ids[0], group_ids[1], group_ids[2:]
    members = tenant.members
    bad_ids = [user_id for ids in bad.values() for user_id in ids]

    # Pilot: ~30 users, some of them the awkward ones, plus a nested group.
    pilot_bad = [ids[0] for ids in bad.values()]
    members[pilot] = rng.sample(normal, PILOT_SIZE - len(pilot_bad)) + pilot_bad + [champions]
    members[champions] = rng.sample(normal, 8)
    members[champions].append(tenant.add_other("orgContact"))
    members[ordinary[0]].extend([tenant.add_other("device"), tenant.add_other("servicePrincipal")])

    _nest(tenant, rng, ordinary, depth)
    if bad:
        cycle_a, cycle_b, selfish = ordinary[-3], ordinary[-2], ordinary[-1]
        members[cycle_a].append(cycle_b)
        members[cycle_b].append(cycle_a)
        members[selfish].append(selfish)
        members[ordinary[0]].extend(bad_ids)  # every bad record belongs to some group

    done = sum(len(members[g]) for g in (pilot, champions)) + len(bad_ids)
    _spread_users(members, rng, ordinary, normal, max(target - done, 0))


def _nest(tenant: Tenant, rng: random.Random, ordinary: list[str], depth: int) -> None:
    """A chain `depth` groups deep, then about a quarter of the rest under a random parent."""
    if depth < 2:
        return
    chain = ordinary[1 : 1 + depth]
    for parent, child in zip(chain, chain[1:]):
        tenant.members[parent].append(child)
    by_level: list[list[str]] = [[g] for g in chain]
    for group_id in ordinary[1 + depth : -3]:  # the last three are kept for the cycle cast
        level = rng.randint(1, depth - 1) if rng.random() < 0.25 else 0
        if level:
            tenant.members[rng.choice(by_level[level - 1])].append(group_id)
        by_level[level].append(group_id)


def _spread_users(
    members: dict[str, list[str]], rng: random.Random, ordinary: list[str], users: list[str], target: int
) -> None:
    """Zipf-like group sizes: a few big groups, a long tail of small ones."""
    weights = [1 / (rank + 1) ** 0.8 for rank in range(len(ordinary))]
    rng.shuffle(weights)
    total = sum(weights)
    for group_id, weight in zip(ordinary, weights):
        size = min(round(target * weight / total), len(users))
        chosen = rng.sample(users, size)
        members[group_id][:0] = chosen  # users first, nested groups after
