//! The store's invariants, checked by recounting every slot (O(total); for tests, stress
//! runs and debugging).

use super::{
    DETACHED, IN_POOL, NIL, PIN_PENDING, PINNED, PoolCounts, RESET_ON_RELEASE, SlotState,
    StoreState, USED,
};
use crate::error::InvariantError;
use crate::ids::BlockId;

impl StoreState {
    /// Recounts every slot and checks:
    /// * each slot is in exactly one place: the reset stack (once), the inactive pool, or held
    ///   by handles, as its state says;
    /// * the recorded counts equal the recount, and `reset + inactive + mutable + active ==
    ///   total`;
    /// * active blocks have owners, all other blocks none (exact even while other threads
    ///   clone and drop handles: a count changes between 0 and 1 only under the lock);
    /// * the held blocks that a scan left in the inactive pool (`IN_POOL`) are active and
    ///   counted;
    /// * purged blocks still held (`DETACHED`) are active, unpinned, out of the pool and out
    ///   of the registry, and counted; "do not cache" marks are only on registered blocks;
    /// * every registered slot is reachable from the registry through its hash's duplicate
    ///   list, and the lists are well linked;
    /// * the eviction policy's own structure is sound.
    pub(crate) fn check_invariants(&self) -> Result<PoolCounts, InvariantError> {
        let total = self.slots.len();
        let slot_err = |id: usize, detail| InvariantError::Slot {
            block: BlockId::new(id as u32),
            detail,
        };

        let mut in_reset = vec![false; total];
        for id in &self.reset {
            let i = id.index();
            if i >= total {
                return Err(slot_err(i, "reset pool holds an out-of-range id"));
            }
            if std::mem::replace(&mut in_reset[i], true) {
                return Err(slot_err(i, "in the reset pool twice"));
            }
        }

        let (mut reset, mut inactive, mut mutable, mut active, mut pinned) = (0, 0, 0, 0, 0);
        let mut held_in_pool = 0;
        let mut detached = 0;
        for (i, slot) in self.slots.iter().enumerate() {
            let id = BlockId::new(i as u32);
            if in_reset[i] != (slot.state == SlotState::Reset) {
                return Err(slot_err(
                    i,
                    "reset state and reset pool membership disagree",
                ));
            }
            if slot.flags & DETACHED != 0 {
                detached += 1;
                if slot.state != SlotState::Active || slot.flags != DETACHED {
                    return Err(slot_err(i, "detached but not a plain active block"));
                }
            }
            if slot.flags & RESET_ON_RELEASE != 0
                && !matches!(slot.state, SlotState::Active | SlotState::Inactive)
            {
                return Err(slot_err(
                    i,
                    "\"do not cache\" mark on an unregistered block",
                ));
            }
            let in_pool = slot.flags & IN_POOL != 0;
            if slot.flags & USED != 0 && !in_pool {
                return Err(slot_err(i, "marked used but not held in the pool"));
            }
            if in_pool {
                held_in_pool += 1;
                if slot.state != SlotState::Active {
                    return Err(slot_err(i, "left in the pool by a scan but not active"));
                }
            }
            if self.inactive.contains(id) != (slot.state == SlotState::Inactive || in_pool) {
                return Err(slot_err(
                    i,
                    "inactive state and inactive pool membership disagree",
                ));
            }
            match slot.state {
                SlotState::Reset => reset += 1,
                SlotState::Mutable => mutable += 1,
                SlotState::Active => active += 1,
                SlotState::Inactive => inactive += 1,
            }
            let registered = matches!(slot.state, SlotState::Active | SlotState::Inactive);
            let owners = self.refs.get(id);
            if slot.state == SlotState::Active && owners == 0 {
                return Err(slot_err(i, "active without owners"));
            }
            if slot.state != SlotState::Active && (owners != 0 || !self.refs.is_clear(id)) {
                return Err(slot_err(i, "owners recorded on a block that is not active"));
            }
            if !registered && slot.dup_next != NIL {
                return Err(slot_err(i, "unregistered block in a duplicate list"));
            }
            if slot.flags & PIN_PENDING != 0 {
                return Err(slot_err(i, "pin mark left over from a pin call"));
            }
            if slot.flags & PINNED != 0 {
                pinned += 1;
                if slot.state != SlotState::Active {
                    return Err(slot_err(i, "pinned but not active"));
                }
            }
        }

        for (what, recorded, counted) in [
            ("reset pool", self.reset.len(), reset),
            (
                "inactive pool",
                self.inactive.len(),
                inactive + held_in_pool,
            ),
            (
                "held blocks left in the pool",
                self.held_in_pool,
                held_in_pool,
            ),
            ("detached blocks", self.detached, detached),
            ("mutable blocks", self.mutable, mutable),
            ("active blocks", self.active, active),
            ("pinned blocks", self.pinned, pinned),
        ] {
            if recorded != counted {
                return Err(InvariantError::CountMismatch {
                    what,
                    recorded,
                    counted,
                });
            }
        }
        if reset + inactive + mutable + active != total {
            return Err(InvariantError::Conservation {
                reset,
                inactive,
                mutable,
                active,
                total,
            });
        }

        // Walk every hash's duplicate list from its registry head.
        let mut reached = 0usize;
        self.registry
            .check(super::key_in(&self.slots))
            .map_err(|detail| InvariantError::Registry { detail })?;
        for head in self.registry.records() {
            let hash = self.slots[head as usize].hash;
            let mut cur = head;
            while cur != NIL {
                let Some(slot) = self.slots.get(cur as usize) else {
                    return Err(slot_err(cur as usize, "registry points out of range"));
                };
                if !matches!(slot.state, SlotState::Active | SlotState::Inactive) {
                    return Err(slot_err(
                        cur as usize,
                        "registry reaches an unregistered block",
                    ));
                }
                if slot.hash != hash {
                    return Err(slot_err(cur as usize, "registered under a different hash"));
                }
                if slot.flags & DETACHED != 0 {
                    return Err(slot_err(
                        cur as usize,
                        "detached block still in the registry",
                    ));
                }
                reached += 1;
                if reached > active + inactive - detached {
                    return Err(slot_err(cur as usize, "duplicate list has a cycle"));
                }
                cur = slot.dup_next;
            }
        }
        if reached + detached != active + inactive {
            return Err(InvariantError::CountMismatch {
                what: "registered blocks reachable from the registry",
                recorded: active + inactive - detached,
                counted: reached,
            });
        }
        let duplicates = reached - self.registry.len();
        if duplicates != self.duplicates {
            return Err(InvariantError::CountMismatch {
                what: "duplicates",
                recorded: self.duplicates,
                counted: duplicates,
            });
        }

        self.inactive
            .check_invariants()
            .map_err(|detail| InvariantError::Policy {
                policy: self.inactive.name(),
                detail,
            })?;
        Ok(self.counts())
    }
}
