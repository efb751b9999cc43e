//! Who is online: per user (tenant + id), across rooms and connections, and how to reach each
//! of a user's connections from any shard (notifications to a user rather than a room).
//! Striped by user so no lock is shared by everyone; never touched on the chat path.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use smallvec::SmallVec;

use crate::cmd::presence::PresenceStatus;
use crate::shard::{ConnId, ConnRef};

const STRIPES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserKey {
    pub tenant: String,
    pub user_id: String,
}

struct UserPresence {
    /// The user's open connections (bounded by the server's connection limit): one, the usual
    /// case, is held inline (no allocation per idle connection).
    connections: SmallVec<[ConnRef; 1]>,
    status: PresenceStatus,
    /// Rooms joined by any of the user's connections, with how many of them joined each.
    rooms: HashMap<String, u32>,
}

/// The presence registry.
pub struct PresenceRegistry {
    stripes: Vec<Mutex<HashMap<UserKey, UserPresence>>>,
}

impl Default for PresenceRegistry {
    fn default() -> Self {
        PresenceRegistry {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl PresenceRegistry {
    fn stripe(&self, key: &UserKey) -> &Mutex<HashMap<UserKey, UserPresence>> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        &self.stripes[h.finish() as usize % STRIPES]
    }

    /// A connection opened; true when it is the user's first (the user comes online).
    pub fn connect(&self, conn: &ConnRef) -> bool {
        let key = conn.user_key();
        let mut map = self.stripe(&key).lock().expect("presence lock poisoned");
        let entry = map.entry(key).or_insert_with(|| UserPresence {
            connections: SmallVec::new(),
            status: PresenceStatus::Online,
            rooms: HashMap::new(),
        });
        entry.connections.push(conn.clone());
        entry.connections.len() == 1
    }

    /// The user's open connections, wherever they run.
    pub fn connections(&self, key: &UserKey) -> Vec<ConnRef> {
        self.stripe(key)
            .lock()
            .expect("presence lock poisoned")
            .get(key)
            .map(|user| user.connections.to_vec())
            .unwrap_or_default()
    }

    /// A connection closed; when it was the user's last and the user was not already shown as
    /// offline, returns the rooms the user had joined (the user goes offline: a change to tell).
    pub fn disconnect(&self, key: &UserKey, conn: ConnId) -> Option<Vec<String>> {
        let mut map = self.stripe(key).lock().expect("presence lock poisoned");
        let Entry::Occupied(mut entry) = map.entry(key.clone()) else {
            return None;
        };
        entry.get_mut().connections.retain(|c| c.id != conn);
        if !entry.get().connections.is_empty() {
            return None;
        }
        let user = entry.remove();
        (user.status != PresenceStatus::Offline).then(|| user.rooms.into_keys().collect())
    }

    /// Sets an explicit status; when it changed, returns the user's joined rooms.
    pub fn set_status(&self, key: &UserKey, status: PresenceStatus) -> Option<Vec<String>> {
        let mut map = self.stripe(key).lock().expect("presence lock poisoned");
        let user = map.get_mut(key)?;
        if user.status == status {
            return None;
        }
        user.status = status;
        Some(user.rooms.keys().cloned().collect())
    }

    /// One of the user's connections joined a room; true when it is the first of them there.
    pub fn joined(&self, key: &UserKey, room_id: &str) -> bool {
        let mut map = self.stripe(key).lock().expect("presence lock poisoned");
        let Some(user) = map.get_mut(key) else {
            return false;
        };
        let count = user.rooms.entry(room_id.to_owned()).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// One of the user's connections left a room.
    pub fn left(&self, key: &UserKey, room_id: &str) {
        let mut map = self.stripe(key).lock().expect("presence lock poisoned");
        if let Some(user) = map.get_mut(key) {
            if let Entry::Occupied(mut e) = user.rooms.entry(room_id.to_owned()) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// How many of the tenant's agents and admins have a connection open. Walks every stripe:
    /// for a once-a-second dashboard, never for a message.
    pub fn team_online(&self, tenant: &str) -> usize {
        self.stripes
            .iter()
            .map(|stripe| {
                let map = stripe.lock().expect("presence lock poisoned");
                map.iter()
                    .filter(|(key, user)| {
                        key.tenant == tenant
                            && user.connections.iter().any(|c| c.claims.role.sees_notes())
                    })
                    .count()
            })
            .sum()
    }

    /// The user's current status (offline when no connection is open).
    pub fn status(&self, key: &UserKey) -> PresenceStatus {
        self.stripe(key)
            .lock()
            .expect("presence lock poisoned")
            .get(key)
            .map_or(PresenceStatus::Offline, |u| u.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use crate::auth::{Claims, Role};
    use crate::outbox::{Bound, Outbox, OutboxMetrics};

    fn conn(id: ConnId) -> ConnRef {
        let claims = Claims {
            sub: "u".into(),
            tenant: "t".into(),
            role: Role::Agent,
            exp: 0,
            name: None,
            aud: None,
            iss: None,
        };
        ConnRef {
            id,
            home: 0,
            outbox: Arc::new(Outbox::new(
                Bound {
                    frames: 16,
                    bytes: 1 << 20,
                },
                OutboxMetrics::unregistered(),
            )),
            claims: Arc::new(claims),
        }
    }

    #[test]
    fn first_and_last_connection_change_presence() {
        let reg = PresenceRegistry::default();
        let k = UserKey {
            tenant: "t".into(),
            user_id: "u".into(),
        };
        assert!(reg.connect(&conn(1)));
        assert!(!reg.connect(&conn(2)));
        let ids: Vec<ConnId> = reg.connections(&k).iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 2]);
        assert!(reg.joined(&k, "r1"));
        assert!(!reg.joined(&k, "r1"));
        assert_eq!(
            reg.set_status(&k, PresenceStatus::Away),
            Some(vec!["r1".into()])
        );
        assert_eq!(reg.set_status(&k, PresenceStatus::Away), None);
        assert_eq!(reg.disconnect(&k, 1), None);
        assert_eq!(reg.connections(&k).len(), 1);
        assert_eq!(reg.disconnect(&k, 2), Some(vec!["r1".into()]));
        assert_eq!(reg.status(&k), PresenceStatus::Offline);
        assert!(reg.connections(&k).is_empty());
    }
}
