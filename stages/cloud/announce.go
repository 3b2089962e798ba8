package cloud

import (
	"sync"
	"time"
)

// minAnnounceGap and maxAnnounceGap bound the time between two reports
// announcing new rooms.
const (
	minAnnounceGap = 20 * time.Millisecond
	maxAnnounceGap = time.Second
)

// announcer batches the reports that announce rooms new to the node. A
// report (RenewOnline) carries the node's whole room map, so one per op 12
// cost O(rooms on the node) each: one client changing to fresh rooms made
// the node resend its map ~9,000 times/s. Now every join waiting for a
// report shares the next one, at most one runs at a time, and reports are
// spaced by minAnnounceGap or four times the last successful one's
// duration, whichever is longer (up to maxAnnounceGap): announcing takes
// at most a fifth of one core and at most 50 reports/s, however many
// clients join, and the cost per join falls as joins come faster. A
// failed report (logic down) does not count as cost: it was waiting, not
// working, and joins should not wait longer for the next one.
type announcer struct {
	report func() error

	mu      sync.Mutex
	next    *announceRound // the joins waiting for the next report; nil: none
	running bool           // a goroutine is sending reports
	last    time.Time      // when the last report ended
	cost    time.Duration  // how long it took
}

// announceRound is the joins one report serves.
type announceRound struct {
	done chan struct{}
	err  error
}

func newAnnouncer(report func() error) *announcer { return &announcer{report: report} }

// announce waits for a report that starts after it was called, so that
// the report includes whatever the caller changed before.
func (a *announcer) announce() error {
	a.mu.Lock()
	r := a.next
	if r == nil {
		r = &announceRound{done: make(chan struct{})}
		a.next = r
	}
	if !a.running {
		a.running = true
		go a.run()
	}
	a.mu.Unlock()
	<-r.done
	return r.err
}

// run sends reports while joins wait for one, then ends.
func (a *announcer) run() {
	for {
		a.mu.Lock()
		wait := time.Until(a.last.Add(min(max(minAnnounceGap, 4*a.cost), maxAnnounceGap)))
		a.mu.Unlock()
		if wait > 0 {
			time.Sleep(wait) // pacing: joins arriving meanwhile share the report
		}
		a.mu.Lock()
		r := a.next
		a.next = nil
		if r == nil {
			a.running = false
			a.mu.Unlock()
			return
		}
		a.mu.Unlock()
		start := time.Now()
		r.err = a.report()
		end := time.Now()
		close(r.done)
		a.mu.Lock()
		a.last = end
		if r.err == nil {
			a.cost = end.Sub(start)
		}
		a.mu.Unlock()
	}
}
