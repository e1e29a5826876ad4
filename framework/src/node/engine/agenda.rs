//! The order in which the commands of one input run: the order the engine decided them.
//!
//! The runtime and the engine's simulation in the property tests both run commands through an
//! [`Agenda`], so the tests exercise the order the nodes use.

use std::collections::VecDeque;

use super::command::{Command, Note};

/// What to do with the next command of an [`Agenda`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Run it.
    Run(Command),
    /// Do not run it: feed it back to the engine as [`super::Input::GuardFailed`].
    Refuse(Command),
}

/// The commands of one input, run in the order the engine decided them, with the commands
/// that answer an outcome (a claim, a new lease, a failed guard) added as they come.
///
/// - **Answers join the end.** The engine decides the answer to an outcome after every
///   command already queued, so it runs after them. A command decided earlier must never run
///   after a later decision and undo it. That happened once: a node that lost its slot
///   planned a spare's watch ranges and claimed task 0 in one turn; the won claim's staffer
///   ranges ran first, the older ranges replaced them, and the staffer's view was never read
///   again.
/// - **Guards.** A command whose [`Command::guard`] is `Some` is refused unless the lease is
///   within its local deadline right before it runs.
/// - **Epochs in order.** Once an epoch could not be entered, no later epoch of the agenda is
///   entered, and no entry is counted for them.
#[derive(Debug)]
pub(crate) struct Agenda {
    queue: VecDeque<Command>,
    entry_failed: bool,
}

impl Agenda {
    /// The agenda of one input's commands.
    pub(crate) fn new(commands: Vec<Command>) -> Agenda {
        Agenda {
            queue: commands.into(),
            entry_failed: false,
        }
    }

    /// The next command. `lease_valid` says whether the lease is within its local deadline
    /// now; it is asked only for a guarded command.
    pub(crate) fn next(&mut self, lease_valid: impl FnOnce() -> bool) -> Option<Next> {
        loop {
            let command = self.queue.pop_front()?;
            // The count of epochs entered follows each entry: none for one that failed.
            if self.entry_failed && matches!(command, Command::Note(Note::EpochEntered(_))) {
                continue;
            }
            let entry = matches!(command, Command::EnterEpoch { .. });
            let refused =
                (entry && self.entry_failed) || (command.guard().is_some() && !lease_valid());
            self.entry_failed |= entry && refused;
            return Some(if refused {
                Next::Refuse(command)
            } else {
                Next::Run(command)
            });
        }
    }

    /// Adds the commands that answer the outcome of the last command.
    pub(crate) fn answer(&mut self, commands: Vec<Command>) {
        self.queue.extend(commands);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::engine::{Claim, Published};
    use crate::role::Role;

    fn claim() -> Command {
        Command::Claim(Claim::Primary {
            task: 0,
            lease: crate::etcd::lease::LeaseId(1),
        })
    }

    fn watch(generation: u64) -> Command {
        Command::Watch {
            generation,
            ranges: Vec::new(),
        }
    }

    fn drain(agenda: &mut Agenda, valid: bool) -> Vec<Next> {
        std::iter::from_fn(|| agenda.next(|| valid)).collect()
    }

    #[test]
    fn the_answer_to_an_outcome_runs_after_the_commands_decided_before_it() {
        let mut agenda = Agenda::new(vec![claim(), watch(1)]);
        assert_eq!(agenda.next(|| true), Some(Next::Run(claim())));
        agenda.answer(vec![watch(2)]);
        assert_eq!(
            drain(&mut agenda, true),
            vec![Next::Run(watch(1)), Next::Run(watch(2))]
        );
    }

    #[test]
    fn after_an_epoch_is_refused_no_later_epoch_is_entered_nor_counted() {
        let enter = |epoch| Command::EnterEpoch {
            epoch,
            prev: epoch.checked_sub(1),
        };
        let entered = Command::Note(Note::EpochEntered(3));
        let publish = Command::Publish(Published {
            role: Role::Spare,
            acting: false,
            epoch: None,
            finished: false,
            ready: Err(String::new()),
            until: None,
        });
        let mut agenda = Agenda::new(vec![
            enter(4),
            entered.clone(),
            enter(5),
            entered.clone(),
            publish.clone(),
        ]);
        let mut asked = 0;
        let first = agenda.next(|| {
            asked += 1;
            false
        });
        assert_eq!(first, Some(Next::Refuse(enter(4))));
        // The later entry is refused whatever the lease says; the counts are dropped.
        assert_eq!(
            drain(&mut agenda, true),
            vec![Next::Refuse(enter(5)), Next::Run(publish.clone())]
        );
        assert_eq!(asked, 1);
        // A command that is not guarded does not ask.
        let mut agenda = Agenda::new(vec![publish.clone()]);
        assert_eq!(
            agenda.next(|| panic!("asked for an unguarded command")),
            Some(Next::Run(publish))
        );
    }
}
