package logic

import "imcloud/pipeline/events"

// emitOffline reports the users of an accepted mid push of whom no
// connection was online (PushResult.offline_mids). Logic is the
// authoritative source of "offline": it decides at accept, once per push,
// from the registry the 200 is answered from, so a consumer's fallback
// matches what the caller was told; job's later view (a key that left
// between accept and delivery, poisoned after job.offline_grace) is not
// an event. A key push emits none: its keys' users are not known.
func (p *Pusher) emitOffline(push Push, mids []int64) {
	if !p.events.Enabled(events.Offline) {
		return
	}
	for _, m := range mids {
		p.events.Emit(events.Event{Kind: events.Offline, Mid: m, MsgID: push.ID, Op: push.Operation})
	}
}
