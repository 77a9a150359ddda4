"""Speed-ups of the sandbox's SCIM server that the benchmark applies in its own sandbox process.

Proposed for guardsync/sandbox/scim_server.py (the benchmark's author does not own
it); until it has them, bench.serve applies them so the benchmark measures guardsync
and not the emulator. `python -m bench --stock-sandbox` runs without them.

Member PATCHes of a big group: scim2-server's InMemoryStorage.update re-validates
and re-dumps the whole group (`type(r).model_validate(r.model_dump())`) on every
update, O(members) of pydantic work: ~50 ms a PATCH on a 20,000-member group, which
made the sandbox (one core, 100% busy) the bottleneck of the 100k membership load.
A PATCH that changes only members (name and externalId as stored) needs none of
it: the members are GroupMember models already validated by the PATCH, and neither
uniqueness (displayName) nor the equality indexes (displayName) change.

And reading a group for a PATCH copied each member model (`_copy_group`: ~20 us a
member, 0.4 s for 20,000): members are never edited in place (a member PATCH builds
a new list; a full update builds new models), so a copy of the list can share them.

And `current.members = ...` in `_apply_member_changes` runs the model validators
of the whole group (validate_assignment walks every member: ~40 ms for 20,000); the
new members were validated by the TypeAdapter already, so the list is set as it is.
"""

from __future__ import annotations

from guardsync.sandbox import scim_server
from guardsync.sandbox.scim_server import AtlassianStorage
from pydantic import TypeAdapter


def apply() -> None:
    if getattr(AtlassianStorage, "_bench_fast_member_updates", False):
        return
    original = AtlassianStorage.update

    def update(self, resource_type, resource, *, expected_version=None):
        if resource_type.name != "Group":
            return original(self, resource_type, resource, expected_version=expected_version)
        with self.lock:
            stored = self._stored(resource_type, resource.id)
            if (stored.display_name, stored.external_id) != (resource.display_name, resource.external_id):
                return original(self, resource_type, resource, expected_version=expected_version)
            self._check_version(stored, expected_version)
            # The PATCHed copy's members are fresh GroupMember models: store the list as it is
            # (through __dict__: validate_assignment would re-validate every member).
            stored.__dict__["members"] = resource.members
            stored.meta = stored.meta.model_copy(update={"last_modified": self.clock(), "version": self.next_version()})
            resource.meta = stored.meta
            return resource  # the answer is a 204: nothing reads it but the handler

    def copy_group(group):
        members = group.members
        copied = group.model_copy(update={"members": None}).model_copy(deep=True)
        if members is not None:
            copied.__dict__["members"] = list(members)  # the member models shared: see above
        return copied

    def apply_member_changes(current, changes):
        members = {member.value: member for member in current.members or []}
        before = len(members)
        changed = False
        adapter = TypeAdapter(type(current).model_fields["members"].annotation)
        for op, payload in changes:
            if op == "remove":
                changed |= members.pop(payload, None) is not None
                continue
            for member in adapter.validate_python(payload) or []:
                if member.value not in members:
                    members[member.value] = member
                    changed = True
        if not changed and len(members) == before:
            return None
        current.__dict__["members"] = list(members.values()) or None  # validated above: see the docstring
        return current

    AtlassianStorage.update = update
    scim_server._copy_group = copy_group
    scim_server._apply_member_changes = apply_member_changes
    AtlassianStorage._bench_fast_member_updates = True
