//! Who is online: per user (tenant + id), across rooms and connections. Striped by user so no
//! lock is shared by everyone; never touched on the chat path.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use crate::cmd::presence::PresenceStatus;

const STRIPES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserKey {
    pub tenant: String,
    pub user_id: String,
}

#[derive(Debug)]
struct UserPresence {
    connections: u32,
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
    pub fn connect(&self, key: &UserKey) -> bool {
        let mut map = self.stripe(key).lock().expect("presence lock poisoned");
        let entry = map.entry(key.clone()).or_insert_with(|| UserPresence {
            connections: 0,
            status: PresenceStatus::Online,
            rooms: HashMap::new(),
        });
        entry.connections += 1;
        entry.connections == 1
    }

    /// A connection closed; when it was the user's last and the user was not already shown as
    /// offline, returns the rooms the user had joined (the user goes offline: a change to tell).
    pub fn disconnect(&self, key: &UserKey) -> Option<Vec<String>> {
        let mut map = self.stripe(key).lock().expect("presence lock poisoned");
        let Entry::Occupied(mut entry) = map.entry(key.clone()) else {
            return None;
        };
        entry.get_mut().connections -= 1;
        if entry.get().connections > 0 {
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

    #[test]
    fn first_and_last_connection_change_presence() {
        let reg = PresenceRegistry::default();
        let k = UserKey {
            tenant: "t".into(),
            user_id: "u".into(),
        };
        assert!(reg.connect(&k));
        assert!(!reg.connect(&k));
        assert!(reg.joined(&k, "r1"));
        assert!(!reg.joined(&k, "r1"));
        assert_eq!(
            reg.set_status(&k, PresenceStatus::Away),
            Some(vec!["r1".into()])
        );
        assert_eq!(reg.set_status(&k, PresenceStatus::Away), None);
        assert_eq!(reg.disconnect(&k), None);
        assert_eq!(reg.disconnect(&k), Some(vec!["r1".into()]));
        assert_eq!(reg.status(&k), PresenceStatus::Offline);
    }
}
