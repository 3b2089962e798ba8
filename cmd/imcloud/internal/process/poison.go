package process

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"imcloud/pipeline"
)

// The admin listener's poison endpoints, served when the process runs the
// embedded broker, whose poison topic lives in its memory and nowhere
// else (imcloud poison --admin is their client):
//
//	GET  /poison          list, oldest first, a page of at most limit
//	                      (default 1000) entries after the key after
//	                      (?payload=true adds the bodies)
//	POST /poison/replay   re-publish, each to the push shard it was
//	                      poisoned from (pipeline.ReplayTargets.For)
//	POST /poison/purge    drop
//
// Replay and purge take the messages as repeated key values (the broker's
// names for them, unique), repeated id values (refused when one id names
// more than one entry: a publisher chooses ids), or all=true, and answer
// PoisonResult.
const (
	PoisonPath        = "/poison"
	PoisonReplayPath  = "/poison/replay"
	PoisonPurgePath   = "/poison/purge"
	poisonMaxFormBody = 1 << 20 // about 25,000 ids: more than the ring holds by default
	// PoisonListDefault and PoisonListMax bound a page of GET /poison: an
	// entry is about 250 bytes of JSON without its payload.
	PoisonListDefault = 1000
	PoisonListMax     = 10000
)

// PoisonEntry is one poisoned message as GET /poison lists it.
type PoisonEntry struct {
	// Key is the broker's unique name for the entry: select by it.
	Key string `json:"key"`
	// ID is the message's id, chosen by its publisher and not unique.
	ID           string    `json:"id"`
	PoisonedAt   time.Time `json:"poisoned_at"`
	Handler      string    `json:"handler"`
	Reason       string    `json:"reason"`
	PayloadBytes int       `json:"payload_bytes"`
	// Payload is sent only when asked for (?payload=true): a push's body
	// is the application's, and a list is for finding ids and reasons.
	Payload     []byte `json:"payload,omitempty"`
	Undecodable string `json:"undecodable,omitempty"`
}

// PoisonEntryOf describes m, with its payload if withPayload.
func PoisonEntryOf(m pipeline.Poisoned, withPayload bool) PoisonEntry {
	e := PoisonEntry{Key: m.Key, ID: m.ID, PoisonedAt: m.PoisonedAt, Handler: m.Handler(), Reason: m.Reason(), PayloadBytes: len(m.Payload), Undecodable: m.Undecodable}
	if withPayload {
		e.Payload = m.Payload
	}
	return e
}

// PoisonList is GET /poison's answer.
type PoisonList struct {
	Topic    string        `json:"topic"`
	Messages []PoisonEntry `json:"messages"`
	// More says entries remain after this page: ask again with after set
	// to the last message's key.
	More bool `json:"more"`
}

// PoisonResult answers a replay or purge: how many messages it acted on,
// and, when it failed (with Count done before), why.
type PoisonResult struct {
	Action string `json:"action"`
	Count  int    `json:"count"`
	// Replayed is how many a replay published to each push shard.
	Replayed pipeline.Replayed `json:"replayed,omitempty"`
	Error    string            `json:"error,omitempty"`
}

// poisonHandler serves the poison endpoints over admin, which replays to
// the push shards.
type poisonHandler struct {
	admin  pipeline.PoisonAdmin
	topic  string
	logger *slog.Logger
}

func (h *poisonHandler) register(mux *http.ServeMux) {
	mux.HandleFunc(PoisonPath, h.list)
	mux.HandleFunc(PoisonReplayPath, func(w http.ResponseWriter, r *http.Request) { h.act(w, r, "replay") })
	mux.HandleFunc(PoisonPurgePath, func(w http.ResponseWriter, r *http.Request) { h.act(w, r, "purge") })
}

// registerNoPoison answers the poison endpoints on a process whose broker
// is shared: its poison topic is reached from anywhere, not through here.
func registerNoPoison(mux *http.ServeMux, kind string) {
	for _, p := range []string{PoisonPath, PoisonReplayPath, PoisonPurgePath} {
		mux.HandleFunc(p, func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, fmt.Sprintf("not served: broker.kind %q is a shared broker; use imcloud poison with its configuration, without --admin", kind), http.StatusNotFound)
		})
	}
}

func (h *poisonHandler) list(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "use GET", http.StatusMethodNotAllowed)
		return
	}
	withPayload := false
	if v := r.URL.Query().Get("payload"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			http.Error(w, fmt.Sprintf("payload=%q: want true or false", v), http.StatusBadRequest)
			return
		}
		withPayload = b
	}
	limit := PoisonListDefault
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > PoisonListMax {
			http.Error(w, fmt.Sprintf("limit=%q: want 1 to %d", v, PoisonListMax), http.StatusBadRequest)
			return
		}
		limit = n
	}
	msgs, more, err := h.admin.List(r.Context(), r.URL.Query().Get("after"), limit)
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, pipeline.ErrBadKey) {
			code = http.StatusBadRequest
		}
		h.logger.Warn("poison: list", "err", err)
		http.Error(w, "list poisoned messages: "+err.Error(), code)
		return
	}
	out := PoisonList{Topic: h.topic, Messages: make([]PoisonEntry, 0, len(msgs)), More: more}
	for _, m := range msgs {
		out.Messages = append(out.Messages, PoisonEntryOf(m, withPayload))
	}
	writeJSON(w, http.StatusOK, out)
}

// act replays or purges the messages the request names.
func (h *poisonHandler) act(w http.ResponseWriter, r *http.Request, action string) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		http.Error(w, "use POST", http.StatusMethodNotAllowed)
		return
	}
	// The listener has no authentication, only loopback: a page in a
	// browser on this machine may post a form to it, and a browser says
	// where such a request comes from; the CLI and curl say nothing.
	if o := r.Header.Get("Origin"); o != "" {
		http.Error(w, "refused: a request from a web page ("+o+")", http.StatusForbidden)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, poisonMaxFormBody)
	if err := r.ParseForm(); err != nil {
		code := http.StatusBadRequest
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			code = http.StatusRequestEntityTooLarge
		}
		http.Error(w, "read the form: "+err.Error(), code)
		return
	}
	sel, err := selection(r.Context(), h.admin, r.Form["key"], r.Form["id"], r.Form.Get("all"))
	if err != nil {
		code := http.StatusBadRequest
		if !errors.Is(err, errSelection) && !errors.Is(err, pipeline.ErrAmbiguousID) {
			code = http.StatusInternalServerError
		}
		http.Error(w, err.Error(), code)
		return
	}
	res := PoisonResult{Action: action}
	switch action {
	case "replay":
		res.Replayed, err = h.admin.Replay(r.Context(), sel)
		res.Count = res.Replayed.Total()
	default:
		res.Count, err = h.admin.Purge(r.Context(), sel)
	}
	code := http.StatusOK
	if err != nil {
		res.Error = err.Error()
		code = http.StatusInternalServerError
	}
	h.logger.Info("poison: "+action+" over the admin listener", "count", res.Count, "replayed", res.Replayed, "err", err)
	writeJSON(w, code, res)
}

// errSelection marks a request that names its messages wrongly.
var errSelection = errors.New("bad selection")

// selection is what key values, id values or all=true pick; one of them.
// Ids are resolved to keys (pipeline.ResolveIDs), refused when one names
// more than one entry.
func selection(ctx context.Context, admin pipeline.PoisonAdmin, keys, ids []string, all string) (pipeline.Selector, error) {
	everything := false
	if all != "" {
		b, err := strconv.ParseBool(all)
		if err != nil {
			return nil, fmt.Errorf("%w: all=%q: want true or false", errSelection, all)
		}
		everything = b
	}
	given := 0
	for _, g := range []bool{everything, len(keys) > 0, len(ids) > 0} {
		if g {
			given++
		}
	}
	switch {
	case given > 1:
		return nil, fmt.Errorf("%w: give key values, id values or all=true, one of them", errSelection)
	case everything:
		return pipeline.All, nil
	case len(keys) > 0:
		return pipeline.Keys(keys...), nil
	case len(ids) > 0:
		return pipeline.ResolveIDs(ctx, admin, ids...)
	default:
		return nil, fmt.Errorf("%w: say which messages: key or id (repeatable) or all=true", errSelection)
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
