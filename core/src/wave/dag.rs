//! The dependency graph: topological order, work and span, Graphviz.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::spec::*;

impl WaveSpec {
    /// Task indices with every task after all its dependencies; among tasks whose dependencies
    /// are done, file order first. Tasks on a cycle (which `validate` rejects) are left out.
    pub fn topological_order(&self) -> Vec<usize> {
        let n_tasks = self.tasks.len();
        let mut n_pending_deps = vec![0usize; n_tasks];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n_tasks];
        for (index, task) in self.tasks.iter().enumerate() {
            for &dep in task.deps.iter().filter(|&&dep| dep < n_tasks) {
                n_pending_deps[index] += 1;
                dependents[dep].push(index);
            }
        }
        let mut ready: BinaryHeap<Reverse<usize>> = (0..n_tasks)
            .filter(|&i| n_pending_deps[i] == 0)
            .map(Reverse)
            .collect();
        let mut order = Vec::with_capacity(n_tasks);
        while let Some(Reverse(index)) = ready.pop() {
            order.push(index);
            for &dependent in &dependents[index] {
                n_pending_deps[dependent] -= 1;
                if n_pending_deps[dependent] == 0 {
                    ready.push(Reverse(dependent));
                }
            }
        }
        order
    }

    /// The work–span bound of the DAG: `(total work, span)` in milliseconds.
    ///
    /// `group_work_ms[i]` is the work of task `i` (the sum of its micro-tasks' run times) and
    /// `group_longest_ms[i]` its longest micro-task: the micro-tasks of one task can at best
    /// run side by side, so a task adds its longest micro-task to any path through it. The span
    /// is the heaviest dependency path by that weight; `work / span` bounds the speed-up any
    /// number of nodes could reach. Missing entries count as 0; sums saturate.
    pub fn work_and_span(&self, group_work_ms: &[u64], group_longest_ms: &[u64]) -> (u64, u64) {
        let work_ms = (0..self.tasks.len())
            .map(|index| group_work_ms.get(index).copied().unwrap_or(0))
            .fold(0u64, u64::saturating_add);
        let mut finish_ms = vec![0u64; self.tasks.len()];
        let mut span_ms = 0;
        for index in self.topological_order() {
            let ready_ms = self.tasks[index]
                .deps
                .iter()
                .filter_map(|&dep| finish_ms.get(dep).copied())
                .max()
                .unwrap_or(0);
            let longest_ms = group_longest_ms.get(index).copied().unwrap_or(0);
            finish_ms[index] = ready_ms.saturating_add(longest_ms);
            span_ms = span_ms.max(finish_ms[index]);
        }
        (work_ms, span_ms)
    }

    /// The DAG in Graphviz DOT: one box per task (labelled `id [N]` for an array of N), an edge
    /// from each dependency to its dependent.
    pub fn to_dot(&self) -> String {
        let mut dot = format!("digraph \"{}\" {{\n", dot_escape(&self.name));
        dot.push_str("  rankdir=LR;\n  node [shape=box];\n");
        for task in &self.tasks {
            let label = match task.array {
                Some(n) => format!("{} [{n}]", task.id),
                None => task.id.clone(),
            };
            dot.push_str(&format!(
                "  \"{}\" [label=\"{}\"];\n",
                dot_escape(&task.id),
                dot_escape(&label)
            ));
        }
        for task in &self.tasks {
            for dep in task.deps.iter().filter_map(|&dep| self.tasks.get(dep)) {
                dot.push_str(&format!(
                    "  \"{}\" -> \"{}\";\n",
                    dot_escape(&dep.id),
                    dot_escape(&task.id)
                ));
            }
        }
        dot.push_str("}\n");
        dot
    }
}

fn dot_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            c if c.is_control() => {}
            c => escaped.push(c),
        }
    }
    escaped
}
